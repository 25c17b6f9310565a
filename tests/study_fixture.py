"""Write a small but complete study folder exactly as ``docs/formats.md`` describes it.

Used by the reporting tests in place of a real ``histotoken grid`` run: 3 models x train
domains 100, 400, 100+400 x test domains 100, 400, 100+400, one seed, the 8 BreakHis subtypes,
one run that failed, one run trained in two stages, and a tiny BreakHis-layout image folder
for the dataset preview. Every number comes from a seeded numpy generator, and the metrics in
``results.csv`` are computed from the confusion matrices written to ``eval/<domain>.json``.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

SUBTYPES = (
    "adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma",
    "ductal_carcinoma", "lobular_carcinoma", "mucinous_carcinoma", "papillary_carcinoma",
)
SUBTYPE_CODES = ("A", "F", "PT", "TA", "DC", "LC", "MC", "PC")
MAGNIFICATIONS = (40, 100, 200, 400)
# kind="cifar10": a CIFAR-10-like study (no magnifications, each image its own group, train/test domain "all")
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat")
CIFAR_DOMAINS = ("all",)
CIFAR_IMAGES_PER_CLASS = 6  # per split side
# (label, timm name, kwargs, in-domain quality, gflops, throughput, params, tokens_final)
MODELS = (
    ("resnet18", "resnet18", {}, 0.82, 1.82, 90.0, 11.2, None),
    ("deit_small_patch16_224", "deit_small_patch16_224", {}, 0.78, 4.61, 60.0, 21.7, 197),
    ("cnnprune_vit_small@keep_ratio=0.5", "cnnprune_vit_small", {"keep_ratio": 0.5}, 0.75, 2.40, 150.0, 22.1, 99),
)
DOMAINS = ("100", "400", "100+400")
FAILED_RUN = ("cnnprune_vit_small@keep_ratio=0.5", "100+400")
TWO_STAGE_RUN = ("deit_small_patch16_224", "100")
PATIENTS_PER_CLASS = 3  # one each for train, val and test
TASK = "subtype"
SEED = 0


def run_id_of(model: str, train_domain: str, seed: int = SEED) -> str:
    """As ``histotoken grid`` names run folders: ``@`` and ``=`` in a label become ``-``."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", f"{model}__{TASK}__train{train_domain}__seed{seed}").strip("-")


def _shift(train_domain: str, test_domain: str) -> float:
    """Macro-F1 lost by testing away from the training magnification (asymmetric on purpose)."""
    if train_domain == test_domain:
        return 0.0
    train, test = set(train_domain.split("+")), set(test_domain.split("+"))
    if test <= train:
        return 0.03
    if train == {"100"} and test == {"400"}:
        return 0.30
    if train == {"400"} and test == {"100"}:
        return 0.15
    return 0.12  # partly seen (single -> mixed)


def classes_of(kind: str) -> tuple[str, ...]:
    return CIFAR_CLASSES if kind == "cifar10" else SUBTYPES


def cifar_key(data_root: Path, batch: str, record: int) -> str:
    """A CIFAR-10 index key, as the data source writes it: ``<file>.bin#<record>``."""
    return f"{data_root / 'cifar-10-batches-bin' / batch}#{record}"


def test_images(test_domain: str, kind: str = "breakhis") -> list[tuple[str, str, int]]:
    """(path, patient_id, class index) of a test domain's images: the same for every run, like a shared
    split; a mixed domain holds the images of its magnifications. CIFAR-10 images are their own groups."""
    images = []
    if kind == "cifar10":
        for class_index in range(len(CIFAR_CLASSES)):
            for k in range(CIFAR_IMAGES_PER_CLASS):
                key = f"test_batch.bin#{class_index * CIFAR_IMAGES_PER_CLASS + k}"
                images.append((key, key, class_index))
        return images
    for magnification in test_domain.split("+"):
        for class_index in range(len(SUBTYPES)):
            patient_id = f"14-{1000 + 10 * class_index + 2}"  # the class's test patient
            for k in range(6 + class_index % 3):
                images.append((f"{magnification}X/{patient_id}/img{k:02d}.png", patient_id, class_index))
    return images


def _predictions(rng: np.random.Generator, test_domain: str, quality: float, kind: str = "breakhis") -> pd.DataFrame:
    """eval/<domain>.predictions.csv: each image right with probability about ``quality``."""
    rows = []
    classes = classes_of(kind)
    n_classes = len(classes)
    correct_fraction = float(np.clip(quality, 0.05, 1.0))
    for path, patient_id, target in test_images(test_domain, kind):
        right = rng.random() < correct_fraction
        prediction = target if right else int((target + rng.integers(1, n_classes)) % n_classes)
        probabilities = np.full(n_classes, 0.3 / (n_classes - 1))
        probabilities[prediction] = 0.7
        rows.append({"path": path, "patient_id": patient_id, "target": target, "prediction": prediction,
                     **{f"prob/{name}": float(p) for name, p in zip(classes, probabilities)}})
    return pd.DataFrame(rows)


def _confusion_matrix(rng: np.random.Generator, quality: float, n_classes: int = len(SUBTYPES)) -> np.ndarray:
    """Rows = true class, columns = predicted class; the diagonal fraction is about ``quality``."""
    matrix = np.zeros((n_classes, n_classes), dtype=int)
    for true_class in range(n_classes):
        support = int(rng.integers(8, 21))
        correct_fraction = float(np.clip(quality + rng.normal(0, 0.06), 0.05, 1.0))
        probabilities = np.full(n_classes, (1 - correct_fraction) / (n_classes - 1))
        probabilities[true_class] = correct_fraction
        matrix[true_class] = rng.multinomial(support, probabilities)
    return matrix


def _metrics_from_confusion(matrix: np.ndarray, classes: tuple[str, ...] = SUBTYPES) -> dict:
    true_positives = np.diag(matrix).astype(float)
    support = matrix.sum(axis=1).astype(float)
    predicted = matrix.sum(axis=0).astype(float)
    precision = np.divide(true_positives, predicted, out=np.zeros_like(true_positives), where=predicted > 0)
    recall = np.divide(true_positives, support, out=np.zeros_like(true_positives), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return {
        "accuracy": float(true_positives.sum() / matrix.sum()),
        "balanced_accuracy": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
    }


def _interval(rng: np.random.Generator, value: float) -> list[float]:
    half_width = float(rng.uniform(0.03, 0.08))
    return [round(max(0.0, value - half_width), 4), round(min(1.0, value + half_width), 4)]


def _write_json(path: Path, content: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2), encoding="utf-8")


def write_images(data_root: Path, rng: np.random.Generator, synthetic: bool) -> pd.DataFrame:
    """A tiny BreakHis-layout folder (32x21 px PNGs); returns the split table (absolute paths, as the index)."""
    rows = []
    for class_index, (subtype, code) in enumerate(zip(SUBTYPES, SUBTYPE_CODES)):
        group = "benign" if class_index < 4 else "malignant"
        letter = group[0].upper()
        for patient_index in range(PATIENTS_PER_CLASS):
            patient_id = f"14-{1000 + 10 * class_index + patient_index}"
            folder = Path("BreaKHis_v1/histology_slides/breast") / group / "SOB" / subtype / f"SOB_{letter}_{code}_{patient_id}"
            for magnification in MAGNIFICATIONS:
                relative = folder / f"{magnification}X" / f"SOB_{letter}_{code}-{patient_id}-{magnification}-001.png"
                hue = np.array([200 - 12 * class_index, 90 + 10 * class_index, 170], dtype=float)
                pixels = np.clip(hue + rng.normal(0, 25, size=(21, 32, 3)), 0, 255).astype(np.uint8)
                (data_root / relative).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(data_root / relative)
                rows.append({
                    "path": str((data_root / relative).resolve()), "patient_id": patient_id, "tumor_class": subtype,
                    "label": group, "magnification": magnification,
                    "split": ("train", "val", "test")[patient_index],
                })
    if synthetic:
        _write_json(data_root / "histotoken_synthetic.json", {"seed": SEED, "img_size": [32, 21]})
    return pd.DataFrame(rows)


def write_cifar_split(data_root: Path) -> pd.DataFrame:
    """The split table of a CIFAR-10-like data set: index keys, each image its own group, magnification 0."""
    rows = []
    for class_index, name in enumerate(CIFAR_CLASSES):
        for side, batch in (("train", "data_batch_1.bin"), ("val", "data_batch_2.bin"), ("test", "test_batch.bin")):
            for k in range(CIFAR_IMAGES_PER_CLASS):
                key = cifar_key(data_root, batch, class_index * CIFAR_IMAGES_PER_CLASS + k)
                rows.append({"path": key, "patient_id": key, "tumor_class": name, "label": name,
                             "magnification": 0, "split": side})
    return pd.DataFrame(rows)


def _dataset_json(data_root: Path, split: pd.DataFrame, synthetic: bool) -> dict:
    counts = (
        split.groupby(["tumor_class", "magnification"], sort=False)
        .agg(n_images=("path", "size"), n_patients=("patient_id", "nunique"))
        .reset_index()
    )
    return {
        "data_root": str(data_root), "synthetic": synthetic, "n_images": len(split),
        "n_patients": int(split["patient_id"].nunique()),
        "counts": [
            {"tumor_class": r.tumor_class, "magnification": int(r.magnification),
             "n_images": int(r.n_images), "n_patients": int(r.n_patients)}
            for r in counts.itertuples()
        ],
    }


def _metrics_csv(rng: np.random.Generator, stages: list[int], quality: float,
                 classes: tuple[str, ...] = SUBTYPES) -> pd.DataFrame:
    """One row per epoch; each stage is a new Lightning fit, so ``epoch`` restarts at 0 in each stage."""
    rows = []
    for position, stage in enumerate(stages):
        epoch = position - stages.index(stage)
        progress = (position + 1) / len(stages)
        val_f1 = float(np.clip(quality * (0.6 + 0.4 * progress) + rng.normal(0, 0.02), 0, 1))
        row = {
            "stage": stage, "epoch": epoch, "lr": 1e-3 * (0.5 ** position),
            "train/loss": 2.0 * (1.1 - progress) + rng.uniform(0, 0.05),
            "train/acc": min(1.0, val_f1 + 0.05), "train/macro_f1": min(1.0, val_f1 + 0.04),
            "val/loss": 2.1 * (1.15 - progress) + rng.uniform(0, 0.05),
            "val/acc": min(1.0, val_f1 + 0.02), "val/macro_f1": val_f1,
        }
        row.update({f"val/f1/{name}": float(np.clip(val_f1 + rng.normal(0, 0.05), 0, 1)) for name in classes})
        row.update({"epoch_time_s": float(rng.uniform(5, 9)), "peak_memory_mb": float(rng.uniform(900, 1100))})
        rows.append(row)
    return pd.DataFrame(rows)


def _environment(seed: int) -> dict:
    return {
        "python": "3.12.3", "platform": "Linux-6.8.0-x86_64-with-glibc2.39",
        "packages": {"torch": "2.5.1", "timm": "1.0.11", "lightning": "2.4.0", "torchvision": "0.20.1",
                     "histotoken": "0.1.0"},
        "git_revision": "0123456789abcdef0123456789abcdef01234567",
        "cpu": "Intel(R) Xeon(R) Platinum 8481C", "cpu_count": 2, "gpu": None, "seed": seed,
        "created": "2025-01-01T12:00:00+00:00",
    }


def _run_config(name: str, kwargs: dict, train_domain: str, data_root: Path, splits: Path,
                data_format: str | None = None) -> dict:
    """Every field of histotoken.config.RunConfig, resolved for one run (``data_format`` only when given:
    folders written before the engine recorded the kind of data have none)."""
    model = name if not kwargs else name + ":" + ",".join(f"{k}={v}" for k, v in sorted(kwargs.items()))
    return {
        "data": str(data_root), **({"data_format": data_format} if data_format else {}), "model": model, "task": TASK, "train_domain": train_domain,
        "splits": str(splits), "split_scheme": "patient", "val_fraction": 0.15, "test_fraction": 0.15,
        "folds": None, "fold": 0, "img_size": 64, "epochs": 3, "stage_epochs": None, "batch_size": 16,
        "lr": 0.001, "weight_decay": 0.05, "warmup_epochs": 1, "grad_clip": 1.0, "label_smoothing": 0.0,
        "early_stopping_patience": 10, "balancing": "none", "precision": "bf16-mixed", "accelerator": "auto",
        "devices": "auto", "num_workers": 0, "seed": SEED, "pretrained": False, "weights": None, "merge_r": 0,
    }


def write_study(
    root: Path,
    *,
    synthetic: bool = True,
    models: tuple = MODELS,
    train_domains: tuple[str, ...] = DOMAINS,
    test_domains: tuple[str, ...] = DOMAINS,
    failed_run: tuple[str, str] | None = FAILED_RUN,
    with_images: bool = True,
    with_efficiency: bool = True,
    rng_seed: int = 1234,
    seeds: tuple[int, ...] = (SEED,),
    with_predictions: bool = True,
    kind: str = "breakhis",
    recorded_kind: str | None = None,
) -> Path:
    """Write a data folder and a study folder under ``root``; return the study folder.

    ``kind="cifar10"``: a CIFAR-10-like study instead (4 classes, domain "all", no magnifications, each
    image its own group, no image files). ``recorded_kind``: the ``data_format`` the runs' config.yaml
    records (default: none, as in folders written before the engine recorded it).
    """
    rng = np.random.default_rng(rng_seed)
    data_root = root / "data"
    study = root / "study"
    classes = classes_of(kind)
    if kind == "cifar10":
        split = write_cifar_split(data_root)
        with_images = True  # nothing to delete: CIFAR-10 images live inside batch files
        if train_domains == DOMAINS and test_domains == DOMAINS:
            train_domains = test_domains = CIFAR_DOMAINS
        if failed_run == FAILED_RUN:
            failed_run = None
    else:
        split = write_images(data_root, rng, synthetic)
    if not with_images:
        for path in sorted(data_root.rglob("*.png")):
            path.unlink()

    study.mkdir(parents=True)
    spec = {  # as histotoken.experiments.spec.dump_spec writes it
        "name": "fixture",
        "description": "reporting test fixture",
        "data": str(data_root),
        "tasks": [TASK],
        "models": [{"name": name, "kwargs": kwargs} for _, name, kwargs, *_ in models],
        "train_domains": list(train_domains),
        "test_domains": list(test_domains),
        "seeds": list(seeds),
        "folds": None,
        "split": {"scheme": "patient", "val": 0.15, "test": 0.15},
        "protocol": {"img_size": 64, "epochs": 3, "batch_size": 16, "lr": 0.001, "precision": "bf16-mixed"},
        "efficiency": {"batch_size": 16, "rounds": 3},
    }
    (study / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    _write_json(study / "dataset.json", _dataset_json(data_root, split, synthetic))
    (study / "splits").mkdir()
    for seed in seeds:
        split.to_csv(study / "splits" / f"seed{seed}.csv", index=False)

    run_rows, result_rows = [], []
    for seed, (label, name, kwargs, quality, *_), train_domain in itertools.product(seeds, models, train_domains):
        run_id = run_id_of(label, train_domain, seed)
        run_dir = study / "runs" / run_id
        failed = (label, train_domain) == failed_run
        error = "RuntimeError: loss is NaN at epoch 2 (try a lower learning rate)" if failed else None
        run_rows.append({
            "run_id": run_id, "model": label, "model_name": name, "model_kwargs": json.dumps(kwargs),
            "task": TASK, "train_domain": train_domain, "seed": seed,
            "status": "failed" if failed else "finished", "error": error or "",
            "run_dir": f"runs/{run_id}",
        })
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(_run_config(
            name, kwargs, train_domain, data_root, study / "splits" / f"seed{seed}.csv", recorded_kind
        ), sort_keys=False), encoding="utf-8")
        _write_json(run_dir / "environment.json", _environment(seed))
        split.to_csv(run_dir / "splits.csv", index=False)
        two_stage = (label, train_domain) == TWO_STAGE_RUN
        stages = [1, 2, 2] if two_stage else [1, 1, 1]
        if failed:
            _write_json(run_dir / "status.json", {"state": "failed", "error": error, "best_epoch": None,
                                                   "stages_done": [1]})
            continue
        metrics = _metrics_csv(rng, stages, quality, classes)
        metrics.to_csv(run_dir / "metrics.csv", index=False)
        best_row = int(metrics["val/macro_f1"].idxmax())
        best_epoch = int(metrics["epoch"].iloc[best_row])  # epoch within its stage
        _write_json(run_dir / "status.json", {"state": "finished", "error": None, "best_epoch": best_epoch,
                                               "stages_done": list(dict.fromkeys(stages))})
        _write_json(run_dir / "checkpoints" / "best.json", {
            "model_name": name, "model_kwargs": kwargs, "num_classes": len(classes),
            "class_names": list(classes), "task": TASK, "img_size": 64, "epoch": best_epoch,
            "stage": stages[best_row], "val/macro_f1": float(metrics["val/macro_f1"].max()),
            "val/acc": float(metrics["val/acc"].iloc[best_row]),
        })
        for test_domain in test_domains:
            if with_predictions:  # metrics computed from the per-image predictions written beside them
                predictions = _predictions(rng, test_domain, quality - _shift(train_domain, test_domain), kind)
                (run_dir / "eval").mkdir(exist_ok=True)
                predictions.to_csv(run_dir / "eval" / f"{test_domain}.predictions.csv", index=False)
                matrix = np.zeros((len(classes), len(classes)), dtype=int)
                np.add.at(matrix, (predictions["target"], predictions["prediction"]), 1)
            else:
                matrix = _confusion_matrix(rng, quality - _shift(train_domain, test_domain), len(classes))
            scores = _metrics_from_confusion(matrix, classes)
            patient_accuracy = float(np.clip(scores["accuracy"] + rng.normal(0, 0.05), 0, 1))
            ci95 = {metric: _interval(rng, scores[metric])
                    for metric in ("accuracy", "balanced_accuracy", "macro_f1")}
            _write_json(run_dir / "eval" / f"{test_domain}.json", {
                "domain": test_domain, "task": TASK, "class_names": list(classes),
                "accuracy": scores["accuracy"], "balanced_accuracy": scores["balanced_accuracy"],
                "macro_f1": scores["macro_f1"], "patient_accuracy": patient_accuracy, "ci95": ci95,
                "per_class": scores["per_class"], "confusion_matrix": matrix.tolist(),
                "n_images": int(matrix.sum()), "n_patients": len(classes), "synthetic": synthetic,
                "model_name": name, "train_domain": train_domain,
                "checkpoint": "checkpoints/best.safetensors",
            })
            for metric in ("accuracy", "balanced_accuracy", "macro_f1", "patient_accuracy"):
                value = patient_accuracy if metric == "patient_accuracy" else scores[metric]
                low, high = ci95.get(metric, [None, None])
                result_rows.append({
                    "run_id": run_id, "model": label, "task": TASK, "train_domain": train_domain,
                    "test_domain": test_domain, "seed": seed, "metric": metric, "value": value,
                    "ci_low": low, "ci_high": high,
                })
    pd.DataFrame(run_rows).to_csv(study / "runs.csv", index=False)
    pd.DataFrame(result_rows).to_csv(study / "results.csv", index=False)
    if with_efficiency:
        efficiency = _efficiency_table(models)
        efficiency.to_csv(study / "efficiency.csv", index=False)
        _write_json(study / "efficiency.json", {
            "rows": efficiency.to_dict("records"),
            "machine": {"cpu": "Intel(R) Xeon(R) Platinum 8481C", "cores": 2, "torch": "2.5.1"},
        })
    return study


def _efficiency_table(models: tuple) -> pd.DataFrame:
    rows = []
    first_throughput = models[0][5]
    for label, name, kwargs, _, gflops, throughput, params, tokens_final in models:
        tokens_per_block = [] if tokens_final is None else [197] * 6 + [tokens_final] * 6
        rows.append({
            "model": label, "model_name": name, "model_kwargs": json.dumps(kwargs), "img_size": 64,
            "batch_size": 16, "precision": "bf16", "device": "cpu", "params_m": params, "gflops": gflops,
            "tokens_per_block": json.dumps(tokens_per_block), "tokens_final": tokens_final,
            "latency_ms_median": 1000.0 * 16 / throughput, "latency_ms_p90": 1100.0 * 16 / throughput,
            "throughput_img_s": throughput, "peak_memory_mb": 300.0 + 20 * params,
            "throughput_ratio": throughput / first_throughput,
        })
    return pd.DataFrame(rows)
