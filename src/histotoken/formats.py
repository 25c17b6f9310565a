"""The names of every file, column and metric that one layer writes and another reads.

One module, imported by the engine (which writes run folders), the experiments layer (which
writes study folders) and the reporting layer (which reads both), so that the three cannot
drift apart. docs/formats.md describes the content of each file; this module only names them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

# --------------------------------------------------------------------------- metrics

# Headline metrics of an evaluation, each with a patient-bootstrap interval in ``ci95``.
HEADLINE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
# Metrics collected into a study's results.csv (headline metrics plus the patient recognition rate).
RESULT_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "patient_accuracy")
# eval JSON key: a list of sentences saying what the numbers cannot support (few test patients or
# slides per class, degenerate intervals, undefined AUROC); empty when nothing is flagged.
EVAL_NOTES = "notes"
# Metric names logged during training (metrics.csv columns and Lightning monitors).
VAL_MACRO_F1 = "val/macro_f1"
VAL_ACC = "val/acc"
VAL_LOSS = "val/loss"
TRAIN_LOSS = "train/loss"

# --------------------------------------------------------------------------- run folder

CONFIG_FILE = "config.yaml"
ENVIRONMENT_FILE = "environment.json"
SPLITS_FILE = "splits.csv"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.csv"
SKIPPED_FILE = "skipped_images.csv"
# Stain normalisation (data/stain.py): the target image as a lossless PNG, and its fitted parameters.
STAIN_TARGET_FILE = "stain_target.png"
STAIN_FILE = "stain.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"
BEST_WEIGHTS = "best.safetensors"
BEST_META = "best.json"
EVAL_DIR = "eval"
# eval/<domain>.json is the run's own evaluation; eval/<domain>__<variant>.json an extra one
# (e.g. test-time token merging) that study results leave out.
EVAL_VARIANT_SEPARATOR = "__"

# eval/<domain>.predictions.csv: per-image predictions behind eval/<domain>.json, for paired
# comparisons between runs on the same test images. Columns: path, patient_id, target, prediction
# (class indices into class_names), then one probability column per class, "prob/<class name>".
PREDICTIONS_SUFFIX = ".predictions.csv"
PREDICTION_COLUMNS = ("path", "patient_id", "target", "prediction")
PROBABILITY_PREFIX = "prob/"

# histotoken predict: one row per input image: PREDICT_COLUMNS, one "prob/<class name>" column per
# class, then PREDICT_ERROR_COLUMN (empty, or why the image could not be scored; then no prediction).
PREDICT_COLUMNS = ("path", "predicted_class")
PREDICT_ERROR_COLUMN = "error"

# histotoken export: RUN_DIR/export/<format>/ holds the exported model and EXPORT_MANIFEST (classes,
# normalisation, input size, the run it came from and the parity check against PyTorch).
EXPORT_FORMATS = ("onnx", "torchscript", "timm")
EXPORT_DIR = "export"
EXPORT_MANIFEST = "export.json"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
TIMM_CONFIG_FILE = "config.json"  # the layout timm's save_for_hf writes
TIMM_WEIGHTS_FILE = "model.safetensors"

# explain/<domain>/ (histotoken explain): explain.json (scores, selected images, timings) and PNG figures.
EXPLAIN_DIR = "explain"
EXPLAIN_SCORES = "explain.json"
EXPLAIN_FIGURES = {
    "per_image": "per_image.png",  # each explained image with every method's overlay
    "outcomes": "outcomes_{method}.png",  # class x TP/FP/FN grid of the most confident images
    "token_maps": "token_maps.png",  # TokenLearner's S spatial maps
    "kept_patches": "kept_patches.png",  # CNN-pruned ViT: scorer map and kept patches
    "merge_sources": "merge_sources.png",  # token merging: which patches each final token holds
    "tsne": "tsne.png",  # t-SNE of pooled features, by class and by magnification
    "faithfulness": "faithfulness.png",  # mean deletion / insertion curves against random order
}

# Grid claims (histotoken.experiments.locks): claim.json exists while one worker owns the run
# (host, pid, start time; its mtime is the heartbeat); attempts.jsonl gets one line per claim
# that went on to train/evaluate, written only by the claim's holder.
CLAIM_FILE = "claim.json"
ATTEMPTS_FILE = "attempts.jsonl"

# status.json "state"
STATE_NEW = "new"
STATE_RUNNING = "running"
STATE_FINISHED = "finished"
STATE_FAILED = "failed"
STATE_INTERRUPTED = "interrupted"


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Every path inside one run folder (``histotoken train --out RUN_DIR``)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def environment(self) -> Path:
        return self.root / ENVIRONMENT_FILE

    @property
    def splits(self) -> Path:
        return self.root / SPLITS_FILE

    @property
    def status(self) -> Path:
        return self.root / STATUS_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def skipped(self) -> Path:
        return self.root / SKIPPED_FILE

    @property
    def stain_target(self) -> Path:
        return self.root / STAIN_TARGET_FILE

    @property
    def stain(self) -> Path:
        return self.root / STAIN_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINT_DIR

    @property
    def last_ckpt(self) -> Path:
        return self.checkpoints / LAST_CKPT

    @property
    def best_weights(self) -> Path:
        return self.checkpoints / BEST_WEIGHTS

    @property
    def best_meta(self) -> Path:
        return self.checkpoints / BEST_META

    @property
    def eval_dir(self) -> Path:
        return self.root / EVAL_DIR

    def eval_file(self, domain: str, variant: str | None = None) -> Path:
        """eval/<domain>.json, or eval/<domain>__<variant>.json for an extra evaluation."""
        suffix = f"{EVAL_VARIANT_SEPARATOR}{variant}" if variant else ""
        return self.eval_dir / f"{domain}{suffix}.json"

    def predictions_file(self, domain: str, variant: str | None = None) -> Path:
        """eval/<domain>.predictions.csv: one row per test image (see PREDICTION_COLUMNS)."""
        suffix = f"{EVAL_VARIANT_SEPARATOR}{variant}" if variant else ""
        return self.eval_dir / f"{domain}{suffix}{PREDICTIONS_SUFFIX}"

    def explain_dir(self, domain: str) -> Path:
        """explain/<domain>/: the figures and explain.json of `histotoken explain`."""
        return self.root / EXPLAIN_DIR / domain

    @property
    def claim(self) -> Path:
        return self.root / CLAIM_FILE

    @property
    def attempts(self) -> Path:
        return self.root / ATTEMPTS_FILE

    def stage_weights(self, stage: int) -> Path:
        return self.checkpoints / f"stage{stage}_final.safetensors"

    def export_dir(self, export_format: str) -> Path:
        """export/<format>/: an exported model and its export.json (histotoken export)."""
        return self.root / EXPORT_DIR / export_format


def is_variant_evaluation(path: Path) -> bool:
    """True for eval/<domain>__<variant>.json files, which study results leave out."""
    return EVAL_VARIANT_SEPARATOR in path.stem


# --------------------------------------------------------------------------- study folder

SPEC_FILE = "spec.yaml"
DATASET_FILE = "dataset.json"
SPLITS_DIR = "splits"
RUNS_DIR = "runs"
RUNS_TABLE = "runs.csv"
RESULTS_TABLE = "results.csv"
EFFICIENCY_TABLE = "efficiency.csv"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
FIGURES_DIR = "figures"
SUBMITIT_DIR = "submitit"  # submitit's job scripts, pickles and logs (grid --launcher slurm|submitit-local)

RESULT_COLUMNS = (
    "run_id", "model", "task", "train_domain", "test_domain", "seed", "metric", "value", "ci_low", "ci_high",
)
RUNS_COLUMNS = (
    "run_id", "model", "model_name", "model_kwargs", "task", "train_domain", "seed", "status", "error", "run_dir",
)


@dataclasses.dataclass(frozen=True)
class StudyPaths:
    """Every path inside one study folder (``histotoken grid SPEC --out STUDY_DIR``)."""

    root: Path

    @property
    def spec(self) -> Path:
        return self.root / SPEC_FILE

    @property
    def dataset(self) -> Path:
        return self.root / DATASET_FILE

    @property
    def runs_dir(self) -> Path:
        return self.root / RUNS_DIR

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def split_file(self, split_name: str) -> Path:
        return self.root / SPLITS_DIR / f"{split_name}.csv"

    @property
    def runs_table(self) -> Path:
        return self.root / RUNS_TABLE

    @property
    def results_table(self) -> Path:
        return self.root / RESULTS_TABLE

    @property
    def efficiency_table(self) -> Path:
        return self.root / EFFICIENCY_TABLE

    @property
    def report_html(self) -> Path:
        return self.root / REPORT_HTML

    @property
    def report_md(self) -> Path:
        return self.root / REPORT_MD

    @property
    def figures(self) -> Path:
        return self.root / FIGURES_DIR

    @property
    def submitit(self) -> Path:
        return self.root / SUBMITIT_DIR


# --------------------------------------------------------------------------- tile folder

# ``histotoken tile SLIDES --out TILES_DIR`` (histotoken.data.wsi.tiling): one coordinate table per slide,
# written atomically and last, so its presence marks a finished slide (a re-run skips it).
TILE_TABLES_DIR = "tiles"  # tiles/<slide>.parquet
TILE_THUMBNAILS_DIR = "thumbnails"  # thumbnails/<slide>.png: tissue contour and kept tiles
TILE_SLIDE_RECORDS_DIR = "slides"  # slides/<slide>.json: the slide's summary row (done or failed)
TILE_SUMMARY = "summary.csv"  # one row per slide, rebuilt from slides/*.json
TILE_SETTINGS = "tiling.json"  # the tiling settings; a re-run with other settings is refused
# Columns of tiles/<slide>.parquet: x, y (top-left) in level-0 pixels; read a read_size square at `level`
# and resize it to tile_size; mpp is the tile's microns per pixel; label is "tumor", "normal" or "" (unknown).
TILE_COLUMNS = (
    "slide", "slide_path", "x", "y", "level", "read_size", "tile_size", "mpp",
    "tissue_fraction", "tumor_fraction", "label", "slide_label", "patient_id",
)
TILE_CLASS_NAMES = ("normal", "tumor")
TILE_SUMMARY_COLUMNS = (
    "slide", "slide_path", "status", "error", "n_tiles", "n_tumor_tiles", "tissue_mm2", "tissue_fraction", "slide_mpp",
    "mpp", "level", "width", "height", "slide_label", "patient_id", "annotations", "seconds",
)

# ``histotoken predict RUN_DIR SLIDES --out DIR`` (histotoken.engine.slides): per-slide outputs.
SLIDE_PREDICTIONS_DIR = "tiles"  # tiles/<slide>.parquet: the tile table plus prob/<class> columns
SLIDE_HEATMAPS_DIR = "heatmaps"  # heatmaps/<slide>.png: tumour probability over the thumbnail
SLIDE_SCORES = "slides.csv"  # one row per slide (SLIDE_SCORE_COLUMNS)
SLIDE_EVAL = "eval.json"  # with slide labels: slide- and tile-level metrics (eval/<domain>.json shape)
SLIDE_PREDICTION = "prediction.json"  # run (model, run id), classes, threshold and slide score used
SLIDE_SCORE_COLUMNS = ("slide", "n_tiles", "score_max", "score_topk_mean", "prediction", "slide_label", "patient_id")


@dataclasses.dataclass(frozen=True)
class TilePaths:
    """Every path inside a tile folder (``histotoken tile --out TILES_DIR``)."""

    root: Path

    def table(self, slide: str) -> Path:
        return self.root / TILE_TABLES_DIR / f"{slide}.parquet"

    def thumbnail(self, slide: str) -> Path:
        return self.root / TILE_THUMBNAILS_DIR / f"{slide}.png"

    def record(self, slide: str) -> Path:
        return self.root / TILE_SLIDE_RECORDS_DIR / f"{slide}.json"

    @property
    def summary(self) -> Path:
        return self.root / TILE_SUMMARY

    @property
    def settings(self) -> Path:
        return self.root / TILE_SETTINGS

    def tables(self) -> list[Path]:
        return sorted((self.root / TILE_TABLES_DIR).glob("*.parquet"))


def is_tile_folder(path: Path) -> bool:
    """True for a folder written by ``histotoken tile`` (it has tiling.json and a tiles/ folder)."""
    return (Path(path) / TILE_SETTINGS).is_file() and (Path(path) / TILE_TABLES_DIR).is_dir()


# --------------------------------------------------------------------------- other data sources, decoded stores

# ImageFolder trees (histotoken.data.sources): DATA_ROOT/<class>/**/<image>; an optional CSV maps each
# image (path relative to DATA_ROOT, or file name) to its patient/group, for group-disjoint splits.
GROUPS_FILE = "groups.csv"
GROUP_COLUMNS = ("image", "group")
# CIFAR-10, binary version: DATA_ROOT or DATA_ROOT/cifar-10-batches-bin holds these files; each record is
# 1 label byte + 3072 pixel bytes (R, G, B planes of 32x32, row-major). Index keys: "<file>#<record>".
CIFAR_DIR = "cifar-10-batches-bin"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch.bin"
CIFAR_META_FILE = "batches.meta.txt"
# Index keys of a tile folder's tiles: "<TILES_DIR>/tiles/<slide>.parquet#<row>".
KEY_SEPARATOR = "#"
# Decoded stores (histotoken.data.store), in $HISTOTOKEN_CACHE/stores: <KEY>.npy (uint8 (N, 3, S, S)),
# <KEY>.json (manifest, written last), <KEY>.lock (held while building).
STORES_DIR = "stores"
STORE_MANIFEST_KEYS = ("version", "img_size", "preprocess_key", "shape", "bytes", "keys", "errors")
