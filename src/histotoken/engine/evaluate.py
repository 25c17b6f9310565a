"""``evaluate_run()``: test metrics of a run's best weights on one domain (RUN_DIR/eval/<domain>.json).

The test images are the run's frozen test patients, at the requested magnification(s), so
in-domain and cross-domain figures come from the same patients. Inference runs through Lightning
(:func:`histotoken.engine.inference.predict_logits`) on the run's accelerator, devices and
precision, and counts every readable test image exactly once. Metrics, per-class scores and
the 95% intervals come from :mod:`histotoken.stats` (scikit-learn's definitions; a percentile
bootstrap over test *patients*, within classes when each class has two or more: images of a
patient are correlated, so resampling images would understate the uncertainty), as in the
report. ``notes`` in the result says what the numbers cannot support. Beside each
eval/<domain>.json, the per-image predictions go to eval/<domain>.predictions.csv for paired
comparisons between runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from histotoken import stats
from histotoken.data.breakhis import is_synthetic
from histotoken.data.domains import domain_name, select_domain
from histotoken.data.splits import read_split
from histotoken.formats import (
    EVAL_NOTES,
    HEADLINE_METRICS,
    PROBABILITY_PREFIX,
    RunPaths,
)
from histotoken.io import atomic_write_json, atomic_write_text, read_json

logger = logging.getLogger(__name__)


def compute_metrics(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    patient_ids: Sequence[str],
    class_names: Sequence[str],
    n_bootstrap: int = 1000,
    seed: int = 0,
    unit: str = "patients",
) -> dict[str, Any]:
    """Image-level metrics, per-class scores, confusion matrix, patient accuracy, bootstrap CIs and notes.

    Everything is read off per-patient confusion matrices by :mod:`histotoken.stats` (scikit-learn's
    definitions); the intervals resample whole patients (``unit``: the groups, e.g. slides), within
    classes when every class has two or more (``resampling`` says which). ``notes`` lists what the
    numbers cannot support (:func:`histotoken.stats.evaluation_notes`). With ``n_bootstrap=0`` no
    intervals are computed and ``ci95`` is None.
    """
    y_true, y_pred = np.array(y_true, dtype=np.int64), np.array(y_pred, dtype=np.int64)
    patients = np.asarray(patient_ids).astype(str)
    _, confusions = stats.group_confusions(y_true, y_pred, patients, len(class_names))  # (P, C, C)
    total = confusions.sum(0)
    point = stats.metrics_from_confusion(total)
    scores = stats.per_class_scores(total)
    correct = pd.Series(y_true == y_pred).groupby(patients).mean()
    intervals = None
    if n_bootstrap > 0 and len(confusions):
        intervals = stats.metric_intervals(confusions, n_bootstrap, np.random.default_rng(seed))
    return {
        **{name: float(point[name]) for name in HEADLINE_METRICS},
        # BreakHis patient recognition rate: mean over patients of their fraction of correct images.
        "patient_accuracy": float(correct.mean()),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(
                class_names, scores["precision"], scores["recall"], scores["f1"], scores["support"]
            )
        },
        "confusion_matrix": total.tolist(),
        "class_names": list(class_names),
        "n_images": int(len(y_true)),
        "n_patients": int(len(correct)),
        "n_bootstrap": int(max(n_bootstrap, 0)),
        "ci95": intervals.ci95 if intervals else None,
        "resampling": intervals.scheme if intervals else None,
        EVAL_NOTES: stats.evaluation_notes(confusions, class_names, intervals, unit),
    }


def describe_mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor], examples: int = 5) -> str | None:
    """A short account of why ``state`` does not fit ``model`` (counts plus a few key names), or None if it fits."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected if k in state and state[k].shape != expected[k].shape
    ]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)):
        if keys:
            more = f", ... ({len(keys) - examples} more)" if len(keys) > examples else ""
            parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:examples])}{more})")
    return "; ".join(parts) or None


def load_best_model(run_dir: Path, merge_r: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The run's best weights in a freshly built model, in eval mode; clear errors when they do not fit.

    ``merge_r`` overrides the token merging the run was trained with (ToMe works off the shelf on
    a trained ViT/DeiT: merging changes no weights, only how many tokens each block sees).
    """
    from safetensors.torch import load_file

    from histotoken.models.factory import ModelSpec, create_model

    paths = RunPaths(Path(run_dir))
    if not paths.best_meta.is_file() or not paths.best_weights.is_file():
        raise FileNotFoundError(
            f"{paths.root} has no best checkpoint ({paths.best_weights.name} + {paths.best_meta.name} in "
            f"{paths.checkpoints}); train it first with `histotoken train ... --out {paths.root}`"
        )
    meta = read_json(paths.best_meta)
    spec = ModelSpec(meta["model_name"], tuple(sorted(meta.get("model_kwargs", {}).items())))
    model = create_model(spec, meta["num_classes"], meta["img_size"])
    try:
        state = load_file(str(paths.best_weights))
    except Exception as error:
        raise ValueError(f"cannot read {paths.best_weights} ({error}); the file is damaged: retrain the run") from error
    mismatch = describe_mismatch(model, state)
    if mismatch:
        raise ValueError(
            f"{paths.best_weights} does not fit model {spec.label} with {meta['num_classes']} classes "
            f"(as {paths.best_meta} says): {mismatch}. Was the file copied from another run? "
            "Retrain this run or restore its own checkpoint."
        )
    model.load_state_dict(state)
    trained_r = int(meta.get("merge_r", 0) or 0)
    merge = trained_r if merge_r is None else merge_r
    if merge:
        from histotoken.models.token_merging import apply_token_merging

        apply_token_merging(model, merge)
    model.eval()
    return model, {**meta, "eval_merge_r": merge}


def _rebase_paths(frame: pd.DataFrame, data_root: str | Path, data_format: str = "auto") -> pd.DataFrame:
    """Point the split's keys at another copy of the data, whatever its source (see ``DataSource.rebase``)."""
    from histotoken.data.sources import rebase_frame

    return rebase_frame(frame, data_root, data_format)


def run_settings(run_dir: Path) -> dict[str, Any]:
    """The run's config.yaml as a mapping (accelerator, devices, strategy, precision, seed, ...)."""
    paths = RunPaths(Path(run_dir))
    if not paths.config.is_file():
        raise FileNotFoundError(
            f"{paths.root} is not a run folder (no {paths.config.name}); give the --out folder of `histotoken train`"
        )
    return yaml.safe_load(paths.config.read_text()) or {}


def evaluate_run(
    run_dir: str | Path,
    domain: str,
    data_root: str | Path | None = None,
    batch_size: int = 64,
    n_bootstrap: int = 1000,
    merge_r: int | None = None,
    accelerator: str | None = None,
    devices: int | str | None = None,
) -> dict[str, Any]:
    """Evaluate the best weights of ``run_dir`` on the test patients at ``domain``; write eval/<domain>.json.

    Inference uses the run's accelerator, devices, strategy and precision (``accelerator`` and
    ``devices`` override the first two). Under several processes every process computes the same
    result and only the first writes files. With ``merge_r`` (token merging applied at test time,
    different from training) the result goes to eval/<domain>__merge_r<N>.json instead, so the
    run's own evaluations stay as they are.
    """
    from histotoken.data.dataset import ImageDataset, ImageStore, class_column
    from histotoken.data.stain import saved_stain_normaliser
    from histotoken.data.transforms import model_normalisation
    from histotoken.engine.inference import predict_logits
    from histotoken.engine.precision import resolve_precision
    from histotoken.engine.ranks import is_global_zero

    paths = RunPaths(Path(run_dir))
    config = run_settings(paths.root)
    model, meta = load_best_model(paths.root, merge_r)
    split = read_split(paths.splits, image_scheme=config.get("split_scheme") == "image")  # older image-split runs
    if data_root is not None:
        split = _rebase_paths(split, data_root, config.get("data_format", "auto"))
    test = select_domain(split[split["split"] == "test"], domain, f"the test split of {paths.splits}")
    # The split as a whole is the store's universe: every run and domain of a study shares one decoded store.
    preprocess, preprocess_key = saved_stain_normaliser(paths.root)  # (None, "") without stain normalisation
    store = ImageStore.build(
        test, meta["img_size"], universe=split, preprocess=preprocess, preprocess_key=preprocess_key
    )
    names = meta["class_names"]
    column = meta.get("class_column") or class_column(meta["task"])
    dataset = ImageDataset(store, names, column, transform=lambda image: image)  # normalised on the device
    mean, std = model_normalisation(model)
    accelerator = accelerator or config.get("accelerator", "auto")
    logits = predict_logits(
        model, dataset, mean=mean, std=std, batch_size=batch_size,
        accelerator=accelerator,
        devices=devices or config.get("devices", 1),
        strategy=config.get("strategy", "auto"),
        precision=resolve_precision(config.get("precision", "auto"), accelerator, meta["img_size"]),
    )
    probabilities = torch.softmax(logits, dim=1).numpy()
    y_true = dataset.targets.numpy()
    y_pred = probabilities.argmax(axis=1)
    patients = store.frame["patient_id"].astype(str)
    result = {
        "domain": domain_name(domain),
        "task": meta["task"],
        **compute_metrics(y_true, y_pred, patients, names, n_bootstrap, seed=config.get("seed", 0)),
        "synthetic": is_synthetic(Path(store.frame["path"].iloc[0]).parent),
        "model_name": meta["model_name"],
        "model_kwargs": meta.get("model_kwargs", {}),
        "train_domain": meta["train_domain"],
        "checkpoint": f"{paths.checkpoints.name}/{paths.best_weights.name}",
        "best_epoch": meta.get("epoch"),
        "merge_r": meta["eval_merge_r"],
        "trained_merge_r": int(meta.get("merge_r", 0) or 0),
        "skipped_images": [path for path, _ in store.skipped],
    }
    if is_global_zero():
        variant = _variant(merge_r, meta.get("merge_r", 0))
        predictions = pd.DataFrame(
            {"path": store.frame["path"], "patient_id": patients, "target": y_true, "prediction": y_pred}
        )
        for position, name in enumerate(names):
            predictions[f"{PROBABILITY_PREFIX}{name}"] = probabilities[:, position]
        atomic_write_text(paths.predictions_file(domain_name(domain), variant), predictions.to_csv(index=False))
        atomic_write_json(paths.eval_file(domain_name(domain), variant), result)
    return result


def _variant(merge_r: int | None, trained_merge_r: int | None) -> str | None:
    """The name of an extra evaluation: test-time token merging other than in training."""
    return None if merge_r is None or merge_r == int(trained_merge_r or 0) else f"merge_r{merge_r}"


def eval_path(run_dir: Path, domain: str, merge_r: int | None = None, trained_merge_r: int = 0) -> Path:
    """eval/<domain>.json, or eval/<domain>__merge_r<N>.json for test-time merging other than trained."""
    return RunPaths(Path(run_dir)).eval_file(domain_name(domain), _variant(merge_r, trained_merge_r))
