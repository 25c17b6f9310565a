"""``evaluate_run()``: test metrics of a run's best weights on one domain (RUN_DIR/eval/<domain>.json).

The test images are the run's frozen test patients, at the requested magnification(s), so
in-domain and cross-domain figures come from the same patients. Headline metrics come from
torchmetrics (vectorised over bootstrap resamples), per-class scores and the confusion matrix
from scikit-learn; the 95% intervals are a percentile bootstrap over test *patients* (images
of a patient are correlated, so resampling images would understate the uncertainty).
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
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_f1_score,
    multiclass_recall,
)

from histotoken.data.breakhis import find_breast_root, is_synthetic
from histotoken.data.domains import domain_name, select_domain
from histotoken.data.splits import read_split
from histotoken.io import atomic_write_json, read_json

logger = logging.getLogger(__name__)
HEADLINE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def headline_metrics(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """Accuracy, balanced accuracy and macro-F1 for each row of (R, n) label tensors (torchmetrics).

    Entries equal to -1 are padding and ignored, so rows may hold different numbers of images.
    Macro averages run over the classes present in a row's labels or predictions; balanced
    accuracy is the macro-averaged recall.
    """
    options = {"num_classes": num_classes, "multidim_average": "samplewise", "ignore_index": -1}
    return {
        "accuracy": multiclass_accuracy(y_pred, y_true, average="micro", **options),
        "balanced_accuracy": multiclass_recall(y_pred, y_true, average="macro", **options),
        "macro_f1": multiclass_f1_score(y_pred, y_true, average="macro", **options),
    }


def compute_metrics(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    patient_ids: Sequence[str],
    class_names: Sequence[str],
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Image-level metrics, per-class scores, confusion matrix, patient accuracy and bootstrap CIs."""
    y_true, y_pred = np.array(y_true, dtype=np.int64), np.array(y_pred, dtype=np.int64)
    patients = np.asarray(patient_ids)
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    correct = pd.Series(y_true == y_pred).groupby(patients).mean()
    point = headline_metrics(torch.as_tensor(y_true)[None], torch.as_tensor(y_pred)[None], len(labels))
    result: dict[str, Any] = {
        **{name: float(value[0]) for name, value in point.items()},
        # BreakHis patient recognition rate: mean over patients of their fraction of correct images.
        "patient_accuracy": float(correct.mean()),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "class_names": list(class_names),
        "n_images": int(len(y_true)),
        "n_patients": int(len(correct)),
        "ci95": bootstrap_ci(y_true, y_pred, patients, len(labels), n_bootstrap, seed),
    }
    return result


def bootstrap_ci(
    y_true: np.ndarray, y_pred: np.ndarray, patients: np.ndarray, num_classes: int, n_bootstrap: int, seed: int
) -> dict[str, list[float] | None]:
    """95% percentile intervals from resampling whole patients with replacement."""
    if n_bootstrap <= 0:
        return {name: None for name in HEADLINE_METRICS}
    rng = np.random.default_rng(seed)
    unique = np.unique(patients)
    rows_of = [np.flatnonzero(patients == patient) for patient in unique]
    samples = [np.concatenate([rows_of[i] for i in rng.integers(0, len(unique), len(unique))]) for _ in range(n_bootstrap)]
    width = max(len(rows) for rows in samples)
    index = np.full((n_bootstrap, width), -1)
    for row, rows in enumerate(samples):
        index[row, : len(rows)] = rows
    # (R, width) resampled labels, -1 where a resample holds fewer images
    pad = index < 0
    truth = torch.as_tensor(np.where(pad, -1, y_true[index]))
    predicted = torch.as_tensor(np.where(pad, 0, y_pred[index]))
    values = headline_metrics(truth, predicted, num_classes)
    return {
        name: [float(np.percentile(v.numpy(), 2.5)), float(np.percentile(v.numpy(), 97.5))]
        for name, v in values.items()
    }


def load_best_model(run_dir: Path, merge_r: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The run's best weights in a freshly built model; clear errors when they do not fit.

    ``merge_r`` overrides the token merging the run was trained with (ToMe works off the shelf on
    a trained ViT/DeiT: merging changes no weights, only how many tokens each block sees).
    """
    from safetensors.torch import load_file

    from histotoken.models.factory import ModelSpec, create_model

    meta_path = run_dir / "checkpoints" / "best.json"
    weights_path = run_dir / "checkpoints" / "best.safetensors"
    if not meta_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no best checkpoint (checkpoints/best.safetensors + best.json); "
            "train it first with `histotoken train ... --out {run_dir}`"
        )
    meta = read_json(meta_path)
    spec = ModelSpec(meta["model_name"], tuple(sorted(meta.get("model_kwargs", {}).items())))
    model = create_model(spec, meta["num_classes"], meta["img_size"])
    try:
        state = load_file(str(weights_path))
    except Exception as error:
        raise ValueError(f"cannot read {weights_path} ({error}); the file is damaged: retrain the run") from error
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).splitlines()[0:3]
        raise ValueError(
            f"{weights_path} does not fit model {spec.label} with {meta['num_classes']} classes "
            f"(as {meta_path} says): {' '.join(first)}. Was the file copied from another run? "
            "Retrain this run or restore its own checkpoint."
        ) from error
    trained_r = int(meta.get("merge_r", 0) or 0)
    merge = trained_r if merge_r is None else merge_r
    if merge:
        from histotoken.models.token_merging import apply_token_merging

        apply_token_merging(model, merge)
    model.eval()
    return model, {**meta, "eval_merge_r": merge}


def _rebase_paths(frame: pd.DataFrame, data_root: str | Path) -> pd.DataFrame:
    """Point the split's image paths at another copy of the data (same layout below ``breast``)."""
    breast = find_breast_root(data_root)
    def rebase(path: str) -> str:
        parts = Path(path).parts
        if "breast" not in parts:
            raise ValueError(f"split path {path} is not inside a BreakHis 'breast' folder; cannot move it to {breast}")
        return str(breast.joinpath(*parts[len(parts) - parts[::-1].index("breast"):]))
    frame = frame.copy()
    frame["path"] = frame["path"].map(rebase)
    return frame


@torch.inference_mode()
def predict(model: torch.nn.Module, images: torch.Tensor, transform, batch_size: int, precision: str) -> np.ndarray:
    from histotoken.engine.precision import autocast_context

    predictions = []
    with autocast_context(precision, "cpu"):
        for start in range(0, len(images), batch_size):
            batch = torch.stack([transform(image) for image in images[start : start + batch_size]])
            predictions.append(model(batch).float().argmax(dim=1))
    return torch.cat(predictions).numpy()


def evaluate_run(
    run_dir: str | Path,
    domain: str,
    data_root: str | Path | None = None,
    batch_size: int = 64,
    n_bootstrap: int = 1000,
    merge_r: int | None = None,
) -> dict[str, Any]:
    """Evaluate the best weights of ``run_dir`` on the test patients at ``domain``; write eval/<domain>.json.

    With ``merge_r`` (token merging applied at test time, different from training) the result goes
    to eval/<domain>__merge_r<N>.json instead, so the run's own evaluations stay as they are.
    """
    from histotoken.data.dataset import ImageStore, class_column
    from histotoken.data.transforms import eval_transform, model_normalisation

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml); give the --out folder of `histotoken train`")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    model, meta = load_best_model(run_dir, merge_r)
    split = read_split(run_dir / "splits.csv")
    test = select_domain(split[split["split"] == "test"], domain, f"the test split of {run_dir / 'splits.csv'}")
    if data_root is not None:
        test = _rebase_paths(test, data_root)
    store = ImageStore.build(test, meta["img_size"])
    names = meta["class_names"]
    lookup = {name: i for i, name in enumerate(names)}
    y_true = store.frame[class_column(meta["task"])].map(lookup).to_numpy()
    mean, std = model_normalisation(model)
    y_pred = predict(model, store.images, eval_transform(mean, std), batch_size, meta.get("precision", "32-true"))
    result = {
        "domain": domain_name(domain),
        "task": meta["task"],
        **compute_metrics(y_true, y_pred, store.frame["patient_id"].astype(str), names, n_bootstrap, seed=config.get("seed", 0)),
        "synthetic": is_synthetic(Path(store.frame["path"].iloc[0]).parent),
        "model_name": meta["model_name"],
        "model_kwargs": meta.get("model_kwargs", {}),
        "train_domain": meta["train_domain"],
        "checkpoint": "checkpoints/best.safetensors",
        "best_epoch": meta.get("epoch"),
        "merge_r": meta["eval_merge_r"],
        "trained_merge_r": int(meta.get("merge_r", 0) or 0),
        "skipped_images": [path for path, _ in store.skipped],
    }
    atomic_write_json(eval_path(run_dir, domain, merge_r, meta.get("merge_r", 0)), result)
    return result


def eval_path(run_dir: Path, domain: str, merge_r: int | None = None, trained_merge_r: int = 0) -> Path:
    """eval/<domain>.json, or eval/<domain>__merge_r<N>.json for test-time merging other than trained."""
    suffix = "" if merge_r is None or merge_r == trained_merge_r else f"__merge_r{merge_r}"
    return Path(run_dir) / "eval" / f"{domain_name(domain)}{suffix}.json"
