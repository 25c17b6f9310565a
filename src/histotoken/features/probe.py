"""Probes on frozen features: ``histotoken train --probe linear|knn|mlp --model NAME --data DATA --out RUN``.

The backbone's features come from :func:`histotoken.features.embed.embed` (computed once, cached in
``$HISTOTOKEN_CACHE/features/`` unless ``--features`` names a folder), and a scikit-learn classifier is
fitted on the run's training patients, as kaiko's eva does for its patch benchmarks:

- ``linear``: ``StandardScaler`` + ``LogisticRegression(C, max_iter)`` (multinomial, L-BFGS);
- ``knn``: ``StandardScaler`` + ``KNeighborsClassifier(k)``;
- ``mlp``: ``StandardScaler`` + ``MLPClassifier`` (one hidden layer, seeded).

The run folder is an ordinary one: config.yaml (the run's settings plus ``probe``), environment.json,
splits.csv (the same frozen patient-disjoint split as fine-tuning: ``engine.fit.prepare_split``),
status.json, metrics.csv (one row: train/val accuracy and macro-F1, seconds) and eval/<domain>.json +
eval/<domain>.predictions.csv, written with ``engine.evaluate.compute_metrics`` so that intervals come
from :mod:`histotoken.stats` and the keys are a fine-tuned run's (plus ``probe``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

PROBES = ("linear", "knn", "mlp")


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    kind: str = "linear"
    C: float = 1.0  # inverse L2 strength of the linear probe (scikit-learn's C)
    max_iter: int = 1000
    k: int = 20  # neighbours of the k-NN probe
    hidden: int = 256  # hidden units of the MLP probe

    def __post_init__(self) -> None:
        if self.kind not in PROBES:
            raise ValueError(f"unknown probe {self.kind!r}; choose one of {', '.join(PROBES)}")


@dataclasses.dataclass
class ProbeResult:
    run_dir: Path
    already_finished: bool
    evaluation: dict[str, Any] | None
    features: Path | None


def make_classifier(settings: ProbeSettings, seed: int = 0, n_train: int | None = None):
    """The scikit-learn pipeline of a probe (standardised features, then the classifier)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if settings.kind == "linear":
        classifier = LogisticRegression(C=settings.C, max_iter=settings.max_iter)
    elif settings.kind == "knn":
        classifier = KNeighborsClassifier(n_neighbors=max(1, min(settings.k, n_train or settings.k)))
    else:
        classifier = MLPClassifier(hidden_layer_sizes=(settings.hidden,), max_iter=settings.max_iter, random_state=seed)
    return make_pipeline(StandardScaler(), classifier)


def default_features_dir(config: Any, img_size: int | None) -> Path:
    """$HISTOTOKEN_CACHE/features/<model>-<hash of model, weights, data, size, merging>."""
    from histotoken.data.index import cache_dir

    weights = config.weights
    if weights:
        stat = Path(weights).stat()
        weights = f"{Path(weights).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    identity = [config.model, weights, config.pretrained, config.data, config.data_format, config.groups, img_size,
                config.merge_r]
    digest = hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()[:12]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in config.model)
    return cache_dir() / "features" / f"{name}-{digest}"


def features_for_frame(keys: np.ndarray, features: np.ndarray, frame: pd.DataFrame, where: Path) -> np.ndarray:
    """Rows of ``features`` in the order of ``frame['path']``; a clear error when keys are missing."""
    position = pd.Series(np.arange(len(keys)), index=pd.Index(keys.astype(str)))
    position = position[~position.index.duplicated()]
    wanted = frame["path"].astype(str)
    missing = wanted[~wanted.isin(position.index)]
    if len(missing):
        raise ValueError(
            f"{len(missing)} images of the split have no features in {where} (e.g. {missing.iloc[0]}); "
            "the features were computed from other data: re-run `histotoken embed` on this data or drop --features"
        )
    return features[position.loc[wanted].to_numpy()]


def train_probe(
    config: Any, run_dir: str | Path, settings: ProbeSettings = ProbeSettings(),
    features: str | Path | None = None, img_size: int | None = None,
) -> ProbeResult:
    """Fit a probe on frozen features with the run's split and write a complete run folder."""
    import yaml

    from histotoken.engine.environment import describe_environment
    from histotoken.engine.fit import prepare_split, read_status, write_status
    from histotoken.features.embed import EmbedSettings, embed
    from histotoken.formats import STATE_FAILED, STATE_FINISHED, STATE_RUNNING, RunPaths
    from histotoken.io import atomic_write_json, atomic_write_text

    paths = RunPaths(Path(run_dir))
    if config.data:
        config = dataclasses.replace(config, data=str(Path(config.data).expanduser().resolve()))
    if read_status(paths)["state"] == STATE_FINISHED:
        logger.info("%s is a finished run; nothing to do (delete it to train again)", paths.root)
        return ProbeResult(paths.root, True, None, None)
    if not config.data:
        raise ValueError("a probe needs the images: give --data DATA_ROOT (its features are computed once and cached)")
    paths.root.mkdir(parents=True, exist_ok=True)
    features_dir = Path(features).expanduser().resolve() if features else default_features_dir(config, img_size)
    recorded = {**config.to_dict(), "probe": settings.kind, "probe_settings": dataclasses.asdict(settings),
                "features": str(features_dir)}
    atomic_write_text(paths.config, yaml.safe_dump(recorded, sort_keys=False))
    atomic_write_json(paths.environment, describe_environment(config.seed))
    write_status(paths, state=STATE_RUNNING, error=None)

    try:
        embedded = embed(config.data, features_dir, EmbedSettings(
            model=config.model, weights=config.weights, pretrained=config.pretrained, img_size=img_size,
            merge_r=config.merge_r, data_format=config.data_format, groups=config.groups,
        ))
        split = prepare_split(config, paths)
        fitted = _fit(config, settings, split, features_dir, paths.splits)
        atomic_write_text(paths.metrics, pd.DataFrame([fitted.metrics_row]).to_csv(index=False))
        evaluation = _write_evaluation(paths, config, settings, fitted, fitted.domain, embedded.manifest, config.bootstrap)
    except BaseException as error:
        write_status(paths, state=STATE_FAILED, error=f"{type(error).__name__}: {error}")
        raise
    write_status(paths, state=STATE_FINISHED, error=None, best_epoch=None)
    return ProbeResult(paths.root, False, evaluation, features_dir)


@dataclasses.dataclass
class _Fitted:
    classifier: Any
    names: list[str]
    column: str
    domain: str  # the train domain
    keys: np.ndarray
    matrix: np.ndarray
    where: Path
    metrics_row: dict[str, Any]

    def test_set(self, split: pd.DataFrame, domain: str, where: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
        """(test rows at ``domain``, their features, their targets)."""
        from histotoken.data.domains import select_domain

        test = select_domain(split[split["split"] == "test"], domain, where)
        label_of = {name: position for position, name in enumerate(self.names)}
        return (test, features_for_frame(self.keys, self.matrix, test, self.where),
                test[self.column].astype(str).map(label_of).to_numpy())


def _fit(config: Any, settings: ProbeSettings, split: pd.DataFrame, features_dir: Path, split_file: Path) -> _Fitted:
    """The probe fitted on the train rows of the train domain (deterministic: a refit gives the same probe)."""
    from histotoken.data.domains import domain_name, select_domain
    from histotoken.data.sources import task_classes
    from histotoken.engine.evaluate import compute_metrics
    from histotoken.features import store

    keys, matrix = store.keyed_features(features_dir)
    names, column = task_classes(config.task, config.data or None, config.data_format, split)
    domain = domain_name(config.train_domain)
    frames = {side: select_domain(split[split["split"] == side], domain, f"the {side} split of {split_file}")
              for side in ("train", "val")}
    label_of = {name: position for position, name in enumerate(names)}
    x = {side: features_for_frame(keys, matrix, frame, features_dir) for side, frame in frames.items()}
    y = {side: frame[column].astype(str).map(label_of).to_numpy() for side, frame in frames.items()}
    start = time.perf_counter()
    classifier = make_classifier(settings, config.seed, len(y["train"])).fit(x["train"], y["train"])
    row: dict[str, Any] = {"probe": settings.kind, "seconds": time.perf_counter() - start}
    for side in ("train", "val"):
        scores = compute_metrics(y[side], classifier.predict(x[side]), frames[side]["patient_id"].astype(str), names,
                                 n_bootstrap=0)
        row.update({f"{side}/accuracy": scores["accuracy"], f"{side}/macro_f1": scores["macro_f1"]})
    return _Fitted(classifier, list(names), column, domain, keys, matrix, features_dir, row)


def evaluate_probe(run_dir: str | Path, domain: str, n_bootstrap: int | None = None) -> dict[str, Any]:
    """Test metrics of a probe run on ``domain`` (e.g. another magnification): the probe is refitted on the
    run's own train rows and features (deterministic, seconds), then tested on the run's test patients at
    ``domain``; writes eval/<domain>.json like :func:`histotoken.engine.evaluate.evaluate_run`."""
    import yaml

    from histotoken.config import RunConfig
    from histotoken.data.domains import domain_name
    from histotoken.data.splits import read_split
    from histotoken.features import store
    from histotoken.formats import RunPaths

    paths = RunPaths(Path(run_dir))
    recorded = yaml.safe_load(paths.config.read_text()) if paths.config.is_file() else None
    if not recorded or "probe" not in recorded:
        raise FileNotFoundError(f"{paths.root} is not a probe run (no probe in {paths.config.name}); "
                                "give the --out folder of `histotoken train --probe`")
    known = {field.name for field in dataclasses.fields(RunConfig)}
    config = RunConfig(**{k: v for k, v in recorded.items() if k in known})
    settings = ProbeSettings(**recorded["probe_settings"])
    features_dir = Path(recorded["features"])
    fitted = _fit(config, settings, read_split(paths.splits), features_dir, paths.splits)
    bootstrap = config.bootstrap if n_bootstrap is None else n_bootstrap
    return _write_evaluation(paths, config, settings, fitted, domain_name(domain), store.read_manifest(features_dir),
                             bootstrap)


def _write_evaluation(paths, config, settings, fitted: _Fitted, domain: str, manifest, n_bootstrap: int):
    from histotoken.data.breakhis import is_synthetic
    from histotoken.data.splits import read_split
    from histotoken.engine.evaluate import compute_metrics
    from histotoken.formats import PROBABILITY_PREFIX
    from histotoken.io import atomic_write_json, atomic_write_text
    from histotoken.models.factory import parse_model_spec

    test, x_test, y_true = fitted.test_set(read_split(paths.splits), domain, f"the test split of {paths.splits}")
    classifier, names = fitted.classifier, fitted.names
    probabilities = classifier.predict_proba(x_test)  # columns: the classes seen in training, sorted
    full = np.zeros((len(x_test), len(names)))
    full[:, classifier.classes_] = probabilities
    y_pred = classifier.classes_[probabilities.argmax(axis=1)]
    patients = test["patient_id"].astype(str)
    spec = parse_model_spec(config.model)
    first = str(test["path"].iloc[0]).split("#")[0] if len(test) else ""
    result = {
        "domain": domain,
        "task": config.task,
        **compute_metrics(y_true, y_pred, patients, names, n_bootstrap, seed=config.seed),
        "synthetic": bool(first) and is_synthetic(Path(first).parent),
        "model_name": spec.name,
        "model_kwargs": spec.kwargs_dict,
        "train_domain": fitted.domain,
        "checkpoint": None,  # a probe keeps no weights file; re-running the command refits it in seconds
        "best_epoch": None,
        "merge_r": int(config.merge_r),
        "trained_merge_r": int(config.merge_r),
        "skipped_images": [],
        "probe": {"kind": settings.kind, **dataclasses.asdict(settings), "feature_key": manifest["feature_key"],
                  "dim": manifest["dim"]},
    }
    predictions = pd.DataFrame({"path": test["path"].to_numpy(), "patient_id": patients.to_numpy(),
                                "target": y_true, "prediction": y_pred})
    for position, name in enumerate(names):
        predictions[f"{PROBABILITY_PREFIX}{name}"] = full[:, position]
    atomic_write_text(paths.predictions_file(domain), predictions.to_csv(index=False))
    atomic_write_json(paths.eval_file(domain), result)
    return result

