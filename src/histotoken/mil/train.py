"""Fit and evaluate slide classifiers on tile-feature bags; the run folder of ``histotoken slides``.

Training is a plain Adam loop, one bag per step (bags differ in size), cross-entropy on the slide
logits (CLAM-SB adds its instance loss: ``(1 - w) * bag + w * instance``). Each training step reads
at most ``train_max_tiles`` random tiles of a slide (a usual MIL augmentation that also bounds
memory). Evaluation reads every tile in chunks for the aggregators that stream (mean, max, ABMIL,
CLAM-SB) and at most ``max_tokens`` evenly spaced tiles for the others.

Splits are by patient (``StratifiedGroupKFold``: one fold of patients is the test set). Metrics on
the test slides: AUROC, balanced accuracy and macro-F1, with 95% intervals over resamples of test
patients from ``histotoken.stats`` (``auroc_interval``, ``bootstrap_intervals``, ``evaluation_notes``).

Run folder: ``config.json``, ``split.csv``, ``model.safetensors``, ``metrics.json`` (training loss
per epoch), ``eval.json`` (test metrics, intervals, notes, cost), ``predictions.csv`` (one row per
test slide with its cost), ``importance/<slide>.csv`` (x, y, importance per tile) and
``heatmaps/<slide>.png`` (the importance over the slide's thumbnail, :mod:`histotoken.mil.heatmaps`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from histotoken import stats
from histotoken.mil.aggregators import BagOutput, MILAggregator, create_aggregator
from histotoken.mil.cost import MEMORY_METHOD, SlideCost, measure
from histotoken.mil.data import (
    CLASS_NAMES,
    SlideBag,
    iter_feature_chunks,
    read_attrs,
    slide_bags,
    subset_indices,
)
from histotoken.mil.heatmaps import write_heatmaps

logger = logging.getLogger(__name__)

Bag = torch.Tensor | SlideBag


@dataclasses.dataclass(frozen=True)
class FitConfig:
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    train_max_tiles: int = 8192


def _training_features(bag: Bag, max_tiles: int, rng: np.random.Generator) -> torch.Tensor:
    if isinstance(bag, torch.Tensor):
        indices = subset_indices(bag.shape[-2], max_tiles, rng)
        return bag if indices is None else bag[..., torch.from_numpy(indices), :]
    features, _ = bag.load(subset_indices(bag.num_tiles(), max_tiles, rng))
    return torch.from_numpy(features)


def bag_loss(model: MILAggregator, output: BagOutput, label: int) -> torch.Tensor:
    loss = torch.nn.functional.cross_entropy(output.logits, torch.tensor([label]))
    if output.aux_loss is not None:
        weight = float(getattr(model, "instance_loss_weight", 0.0))
        loss = (1 - weight) * loss + weight * output.aux_loss
    return loss


def fit_aggregator(model: MILAggregator, bags: Sequence[Bag], labels: Sequence[int],
                   config: FitConfig = FitConfig()) -> list[float]:
    """Train ``model`` in place on the bags; returns the mean training loss of each epoch."""
    if len(bags) != len(labels) or not bags:
        raise ValueError(f"need one label per bag and at least one bag, got {len(bags)} bags, {len(labels)} labels")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history = []
    model.train()
    for epoch in range(config.epochs):
        losses = []
        for index in rng.permutation(len(bags)):
            features = _training_features(bags[index], config.train_max_tiles, rng)
            output = model(features, label=int(labels[index]))
            loss = bag_loss(model, output, int(labels[index]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        history.append(float(np.mean(losses)))
        logger.debug("epoch %d: training loss %.4f", epoch, history[-1])
    model.eval()
    return history


def positive_probability(output: BagOutput) -> float:
    return float(output.logits.softmax(-1)[0, -1])


@torch.no_grad()
def predict_bag(model: MILAggregator, bag: Bag, chunk_size: int = 4096) -> tuple[BagOutput, np.ndarray | None]:
    """Slide output in eval mode, and the coords of the tiles (None for an in-memory bag)."""
    model.eval()
    if isinstance(bag, torch.Tensor):
        if model.streams and bag.shape[-2] > chunk_size:
            return model.forward_chunks(bag.reshape(-1, bag.shape[-1]).split(chunk_size)), None
        return model(bag), None
    coords = bag.coords()
    if model.streams:
        chunks = (torch.from_numpy(chunk) for chunk in iter_feature_chunks(bag.path, chunk_size))
        return model.forward_chunks(chunks), coords
    indices = subset_indices(len(coords), model.max_tokens, rng=None)
    features, _ = bag.load(indices)
    output = model(torch.from_numpy(features))
    if indices is not None:  # importance of the tiles not read: NaN
        full = torch.full((len(coords),), float("nan"))
        full[torch.from_numpy(indices)] = output.importance
        output = dataclasses.replace(output, importance=full, tokens_in=len(coords))
    return output, coords


def predict_slides(model: MILAggregator, bags: Sequence[SlideBag], chunk_size: int = 4096,
                   device: str = "cpu") -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """One row per slide (label, probability, prediction, cost) and each slide's tile importance table."""
    rows, importance = [], {}
    for bag in bags:
        (output, coords), ms, peak_mb = measure(lambda bag=bag: predict_bag(model, bag, chunk_size), device)
        cost = SlideCost(output.tokens_in, output.tokens_kept, ms, peak_mb)
        probability = positive_probability(output)
        rows.append({"slide": bag.slide, "patient_id": bag.patient_id, "label": bag.label,
                     "prob_tumor": probability, "pred": int(probability >= 0.5), **dataclasses.asdict(cost)})
        importance[bag.slide] = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1],
                                              "importance": output.importance.numpy()})
    return pd.DataFrame(rows), importance


def slide_metrics(labels: Sequence[int], probabilities: Sequence[float], patients: Sequence[str],
                  n_resamples: int = stats.DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """AUROC, balanced accuracy and macro-F1 of slide predictions, 95% intervals over patients, notes."""
    labels = np.asarray(labels, dtype=np.int64)
    predictions = (np.asarray(probabilities) >= 0.5).astype(np.int64)
    auroc = stats.auroc_interval(labels, probabilities, patients, n_resamples=n_resamples, seed=seed, unit="slides")
    _, confusions = stats.group_confusions(labels, predictions, patients, 2)
    point = stats.metrics_from_confusion(confusions.sum(0))
    intervals = stats.metric_intervals(confusions, n_resamples, np.random.default_rng(seed)) if n_resamples > 0 else None
    notes = list(auroc.notes) + stats.evaluation_notes(confusions, CLASS_NAMES, intervals, unit="patients")
    if len(labels) < stats.MIN_SLIDES:
        notes.append(f"fewer than {stats.MIN_SLIDES} test slides ({len(labels)}): the metrics rest on very few slides")
    result: dict[str, Any] = {"auroc": auroc.value, "auroc_ci95": auroc.interval}
    for name in ("balanced_accuracy", "macro_f1", "accuracy"):
        result[name] = float(point[name])
        result[f"{name}_ci95"] = intervals.ci95[name] if intervals is not None else None
    result.update({"interval_unit": "patients", "interval_scheme": intervals.scheme if intervals else None,
                   "n_resamples": n_resamples, "n_slides": int(len(labels)),
                   "n_patients": int(len(np.unique(np.asarray(patients).astype(str)))), "notes": notes})
    return result


def split_by_patient(bags: Sequence[SlideBag], test_fraction: float = 0.25, seed: int = 0,
                     strata: Mapping[str, str] | None = None) -> tuple[list[SlideBag], list[SlideBag]]:
    """Train and test slides with no patient on both sides, stratified by slide label (one group k-fold fold);
    with ``strata`` (slide -> a finer class, e.g. the tumour stage) stratified by label and stratum."""
    from sklearn.model_selection import StratifiedGroupKFold

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    patients = [bag.patient_id for bag in bags]
    n_splits = max(2, round(1 / test_fraction))
    if len(set(patients)) < n_splits:
        raise ValueError(f"{len(set(patients))} patients cannot be split into train and test with test fraction "
                         f"{test_fraction}: label more slides, or raise --test-fraction")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    classes = [f"{bag.label}/{(strata or {}).get(bag.slide, '')}" for bag in bags]
    train_index, test_index = next(folds.split(np.zeros(len(bags)), classes, patients))
    return [bags[i] for i in train_index], [bags[i] for i in test_index]


# --------------------------------------------------------------------------- run folders


def _write_evaluation(run_dir: Path, model: MILAggregator, test: Sequence[SlideBag], config: dict[str, Any],
                      n_resamples: int) -> dict[str, Any]:
    table, importance = predict_slides(model, test, config["chunk_size"])
    table.to_csv(run_dir / "predictions.csv", index=False)
    (run_dir / "importance").mkdir(exist_ok=True)
    for slide, frame in importance.items():
        frame.to_csv(run_dir / "importance" / f"{slide}.csv", index=False)
    write_heatmaps(run_dir, {bag.slide: bag.path for bag in test}, importance)
    result = slide_metrics(table["label"], table["prob_tumor"], table["patient_id"], n_resamples, config["seed"])
    result["aggregator"] = config["aggregator"]
    result["cost"] = {
        "tokens_in_mean": float(table["tokens_in"].mean()),
        "tokens_kept_mean": float(table["tokens_kept"].mean()),
        "ms_per_slide_mean": float(table["ms"].mean()),
        "peak_memory_mb_max": float(table["peak_memory_mb"].max()),
        "memory_method": MEMORY_METHOD,
    }
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result


def _build(config: dict[str, Any]) -> MILAggregator:
    return create_aggregator(config["aggregator"], config["in_dim"], 2, **config["aggregator_kwargs"])


def train_run(features_dir: str | Path, labels_csv: str | Path, aggregator: str, out: str | Path,
              fit: FitConfig = FitConfig(), test_fraction: float = 0.25, chunk_size: int = 4096,
              n_resamples: int = stats.DEFAULT_RESAMPLES, aggregator_kwargs: dict[str, Any] | None = None,
              strata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Split by patient (stratified by label, and by ``strata`` when given), fit on the train slides, evaluate on
    the test slides; write the run folder."""
    from safetensors.torch import save_file

    bags = slide_bags(features_dir, labels_csv)
    attrs = read_attrs(bags[0].path)
    config = {"features": str(Path(features_dir).resolve()), "labels": str(Path(labels_csv).resolve()),
              "aggregator": aggregator, "aggregator_kwargs": aggregator_kwargs or {},
              "in_dim": int(attrs["feature_dim"]), "backbone": attrs.get("backbone"), "test_fraction": test_fraction,
              "chunk_size": chunk_size, "n_resamples": n_resamples, "stratified_by_strata": strata is not None,
              **dataclasses.asdict(fit)}
    model = _build(config)  # unknown names fail before any work
    train, test = split_by_patient(bags, test_fraction, fit.seed, strata)
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    pd.DataFrame([{"slide": bag.slide, "patient_id": bag.patient_id, "label": bag.label, "split": split}
                  for split, part in (("train", train), ("test", test)) for bag in part]
                 ).to_csv(run_dir / "split.csv", index=False)
    history = fit_aggregator(model, train, [bag.label for bag in train], fit)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()},
              str(run_dir / "model.safetensors"))
    (run_dir / "metrics.json").write_text(json.dumps({"train_loss": history, "n_train_slides": len(train),
                                                      "n_test_slides": len(test)}, indent=2))
    return _write_evaluation(run_dir, model, test, config, n_resamples)


def evaluate_run(run_dir: str | Path, features_dir: str | Path | None = None) -> dict[str, Any]:
    """Re-evaluate a run's model on its test slides (features from ``features_dir`` if given); rewrites eval.json."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    for name in ("config.json", "split.csv", "model.safetensors"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir / name}: missing; is {run_dir} a folder written by `histotoken slides train`?")
    config = json.loads((run_dir / "config.json").read_text())
    features = Path(features_dir) if features_dir is not None else Path(config["features"])
    bags = {bag.slide: bag for bag in slide_bags(features, config["labels"])}
    split = pd.read_csv(run_dir / "split.csv", dtype={"slide": str})
    test = [bags[slide] for slide in split.loc[split["split"] == "test", "slide"]]
    model = _build(config)
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    model.eval()
    return _write_evaluation(run_dir, model, test, config, config["n_resamples"])
