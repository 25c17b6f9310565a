"""Slide-level prediction: tile slides, score every tile with a trained run, heatmaps and slide scores.

``predict_slides(run_dir, slides, out_dir)`` tiles the slides (reusing ``histotoken tile``'s work, with the
tiling of the run's own tile folder when it was trained on one), scores all tiles in one
``predict_logits`` pass (the run's accelerator and precision), and writes per slide the tile table with
class probabilities, a heatmap of the tumour probability over the thumbnail, and a slide score: the
maximum and the top-k mean tumour probability. With slide labels, slide-level metrics (accuracy etc.
from the slide score at ``threshold``, AUROC from scikit-learn) get percentile-bootstrap intervals over
slides, and tile-level metrics (tiles with annotation labels) intervals over slides too, in the shape of
the BreakHis evaluation (``eval/<domain>.json``), all from :mod:`histotoken.stats`; ``notes`` flags
fewer than 10 slides, few slides per class, degenerate intervals and an undefined AUROC.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from histotoken import formats, stats
from histotoken.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json

logger = logging.getLogger(__name__)

TUMOR_CLASS_NAMES = ("tumor", "tumour", "malignant")
SLIDE_SCORES = ("max", "topk_mean")


def tumor_class_index(class_names: Sequence[str]) -> int:
    """Index of the tumour class among a run's classes (``tumor``, or ``malignant``; else the last class)."""
    lowered = [name.lower() for name in class_names]
    for name in TUMOR_CLASS_NAMES:
        if name in lowered:
            return lowered.index(name)
    logger.warning("no tumour class among %s; scoring slides with the last class", list(class_names))
    return len(class_names) - 1


def slide_scores(probability: np.ndarray, top_k: int) -> tuple[float, float]:
    """(maximum, mean of the ``top_k`` highest) tumour probability of one slide's tiles (NaN without tiles)."""
    if len(probability) == 0:
        return float("nan"), float("nan")
    highest = np.sort(probability)[::-1][: max(top_k, 1)]
    return float(highest[0]), float(highest.mean())


def run_tiling_settings(run_dir: Path, img_size: int):
    """The run's training tiling (its tile folder's tiling.json) or 0.5 mpp tiles of the run's image size."""
    from histotoken.data.wsi.tiling import TilingSettings

    config_path = formats.RunPaths(Path(run_dir)).config
    if config_path.is_file():
        import yaml

        data_root = (yaml.safe_load(config_path.read_text()) or {}).get("data") or ""
        if data_root and formats.is_tile_folder(Path(data_root)):
            return TilingSettings.from_dict(read_json(formats.TilePaths(Path(data_root)).settings))
    return TilingSettings(tile_size=int(img_size))


def auroc_with_interval(
    y_true: np.ndarray, score: np.ndarray, groups: np.ndarray, n_bootstrap: int, seed: int
) -> tuple[float | None, list[float] | None]:
    """scikit-learn's ROC AUC and its 95% interval over resamples of ``groups`` drawn within each label
    (:func:`histotoken.stats.auroc_interval`); None where one class is missing."""
    result = stats.auroc_interval(y_true, score, groups, n_bootstrap, seed)
    return result.value, result.interval


def binary_metrics(
    y_true: np.ndarray, score: np.ndarray, groups: np.ndarray, threshold: float, n_bootstrap: int, seed: int,
    unit: str = "slides",
) -> dict[str, Any]:
    """The BreakHis evaluation's metrics (classes normal, tumor) plus AUROC, intervals over ``groups``
    (``unit``: what a group is, for the notes), with :mod:`histotoken.stats`' notes on weak numbers."""
    from histotoken.engine.evaluate import compute_metrics

    y_pred = (score >= threshold).astype(np.int64)
    result = compute_metrics(y_true, y_pred, groups, formats.TILE_CLASS_NAMES, n_bootstrap, seed, unit=unit)
    auroc = stats.auroc_interval(y_true, score, groups, n_bootstrap, seed, unit=unit)
    result["auroc"] = auroc.value
    if result.get("ci95") is not None and auroc.interval is not None:
        result["ci95"]["auroc"] = auroc.interval
        if auroc.interval[1] - auroc.interval[0] == 0:
            auroc.notes.append(f"zero-width AUROC interval: every resample of the {len(np.unique(groups))} "
                               f"{unit} gives the same value; it shows no uncertainty")
    result[formats.EVAL_NOTES] = result[formats.EVAL_NOTES] + auroc.notes
    return result


def slide_count_notes(n_slides: int) -> list[str]:
    """A note when slide-level metrics rest on fewer than :data:`histotoken.stats.MIN_SLIDES` slides."""
    if n_slides >= stats.MIN_SLIDES:
        return []
    return [f"fewer than {stats.MIN_SLIDES} test slides ({n_slides}): slide-level metrics from so few slides "
            "say little; label more slides"]


class _StainTransform:
    """A run's stain normaliser applied to each tile (kept as it is, with a warning, where it cannot fit)."""

    def __init__(self, normaliser) -> None:
        self.normaliser = normaliser

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.normaliser.normalise_or_keep(image, "a slide tile")


def predict_slides(
    run_dir: str | Path,
    slides: Sequence[str | Path],
    out_dir: str | Path,
    *,
    settings=None,
    annotations_dir: str | Path | None = None,
    labels_csv: str | Path | None = None,
    label_map: Mapping[str, str] | None = None,
    slide_mpp: float | None = None,
    batch_size: int = 64,
    top_k: int = 10,
    threshold: float = 0.5,
    slide_score: str = "max",
    n_bootstrap: int = 1000,
    workers: int = 1,
    num_workers: int = 0,
    accelerator: str | None = None,
    export_annotations: str | None = None,
    export_regions: bool = False,
) -> dict[str, Any]:
    """Score ``slides`` with the run in ``run_dir``; write tile probabilities, heatmaps, slide scores under
    ``out_dir`` (and ``eval.json`` with slide labels; with ``export_annotations`` "geojson" or "asap", the tiles
    as QuPath/ASAP annotations, plus merged tumour regions with ``export_regions``). Returns
    ``{"slides": DataFrame, "eval": dict | None,
    "failed": DataFrame}``."""
    from histotoken.data.stain import saved_stain_normaliser
    from histotoken.data.transforms import model_normalisation
    from histotoken.data.wsi.dataset import TileDataset
    from histotoken.data.wsi.tiling import slide_jobs, tile_slides
    from histotoken.engine.evaluate import load_best_model, run_settings
    from histotoken.engine.inference import predict_logits
    from histotoken.engine.precision import resolve_precision

    if slide_score not in SLIDE_SCORES:
        raise ValueError(f"slide score must be one of {SLIDE_SCORES}, not {slide_score!r}")
    from histotoken.engine.annotations_export import EXPORT_FORMATS

    if export_annotations is not None and export_annotations not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {EXPORT_FORMATS}, not {export_annotations!r}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    model, meta = load_best_model(run_dir)
    class_names = list(meta["class_names"])
    tumor_index = tumor_class_index(class_names)
    settings = settings or run_tiling_settings(run_dir, meta["img_size"])

    # 1. Tiles (resumable: a slide tiled before into OUT/tiling is not tiled again).
    jobs = slide_jobs(slides, annotations_dir, labels_csv, label_map, slide_mpp)
    tile_dir = out_dir / "tiling"
    summary = tile_slides(jobs, tile_dir, settings, workers=workers)
    names = [job.name for job in jobs]
    summary = summary[summary["slide"].isin(names)]
    done = summary[summary["status"] == "done"]
    failed = summary[summary["status"] != "done"]
    tables = {name: pd.read_parquet(formats.TilePaths(tile_dir).table(name)) for name in done["slide"]}
    table = pd.concat(tables.values(), ignore_index=True) if tables else pd.DataFrame(columns=formats.TILE_COLUMNS)

    # 2. One inference pass over every tile of every slide.
    probabilities = np.zeros((len(table), len(class_names)), dtype=np.float32)
    if len(table):
        normaliser, _ = saved_stain_normaliser(run_dir)
        transform = _StainTransform(normaliser) if normaliser is not None else None
        dataset = TileDataset(table, formats.TILE_CLASS_NAMES, transform, image_size=int(meta["img_size"]))
        config = run_settings(run_dir) if formats.RunPaths(run_dir).config.is_file() else {}
        accelerator = accelerator or config.get("accelerator", "auto")
        mean, std = model_normalisation(model)
        logits = predict_logits(
            model, dataset, mean=mean, std=std, batch_size=batch_size, accelerator=accelerator,
            devices=config.get("devices", 1), strategy=config.get("strategy", "auto"),
            precision=resolve_precision(config.get("precision", "auto"), accelerator, meta["img_size"]),
            num_workers=num_workers,
        )
        probabilities = torch.softmax(logits.float(), dim=1).numpy()
    for index, name in enumerate(class_names):
        table[f"{formats.PROBABILITY_PREFIX}{name}"] = probabilities[:, index]
    tumor_probability = probabilities[:, tumor_index] if len(table) else np.zeros(0)

    # 3. Per slide: probabilities, heatmap, scores.
    rows = []
    for name in done["slide"]:
        in_slide = (table["slide"] == name).to_numpy()
        slide_table = table[in_slide].reset_index(drop=True)
        score_max, score_topk = slide_scores(tumor_probability[in_slide], top_k)
        _write_slide_outputs(out_dir, name, slide_table, tumor_probability[in_slide], jobs[names.index(name)], settings,
                             (export_annotations, export_regions, threshold))
        record = done[done["slide"] == name].iloc[0]
        score = score_max if slide_score == "max" else score_topk
        rows.append({
            "slide": name, "n_tiles": int(in_slide.sum()), "score_max": score_max, "score_topk_mean": score_topk,
            "prediction": "" if np.isnan(score) else ("tumor" if score >= threshold else "normal"),
            "slide_label": record["slide_label"] or "", "patient_id": record["patient_id"],
        })
    scores = pd.DataFrame(rows, columns=list(formats.SLIDE_SCORE_COLUMNS))
    atomic_write_text(out_dir / formats.SLIDE_SCORES, scores.to_csv(index=False))
    atomic_write_json(out_dir / formats.SLIDE_PREDICTION, {  # what the slide report states: run, threshold
        "model_name": meta["model_name"], "run_id": run_dir.resolve().name, "run_dir": str(run_dir),
        "class_names": class_names, "tumor_class": class_names[tumor_index], "slides": names,
        "threshold": threshold, "slide_score": slide_score, "top_k": top_k,
        "threshold_source": "default" if threshold == 0.5 else "given",
    })

    # 4. Metrics where slide labels are known.
    evaluation = None
    labelled = scores[scores["slide_label"].isin(formats.TILE_CLASS_NAMES) & (scores["n_tiles"] > 0)]
    if len(labelled):
        seed = int(run_settings(run_dir).get("seed", 0)) if formats.RunPaths(run_dir).config.is_file() else 0
        y_true = (labelled["slide_label"] == "tumor").to_numpy().astype(np.int64)
        score_column = "score_max" if slide_score == "max" else "score_topk_mean"
        slide_ids = labelled["slide"].to_numpy()
        slide_metrics = binary_metrics(y_true, labelled[score_column].to_numpy(), slide_ids, threshold, n_bootstrap,
                                       seed)
        slide_metrics[formats.EVAL_NOTES] = slide_count_notes(len(labelled)) + slide_metrics[formats.EVAL_NOTES]
        evaluation = {
            "domain": "slides", "task": "binary",
            **slide_metrics,
            "n_slides": int(len(labelled)), "slide_score": slide_score, "top_k": top_k, "threshold": threshold,
            "auroc_by_score": {
                score_name: auroc_with_interval(y_true, labelled[f"score_{score_name}"].to_numpy(), slide_ids, 0, seed)[0]
                for score_name in SLIDE_SCORES
            },
        }
        known = table["label"].isin(formats.TILE_CLASS_NAMES).to_numpy()
        if known.any():
            tile_truth = (table.loc[known, "label"] == "tumor").to_numpy().astype(np.int64)
            evaluation["tile_level"] = binary_metrics(
                tile_truth, tumor_probability[known], table.loc[known, "slide"].to_numpy(), 0.5, n_bootstrap, seed
            )
        evaluation.update(model_name=meta["model_name"], run_dir=str(run_dir), tumor_class=class_names[tumor_index],
                          checkpoint=f"{formats.CHECKPOINT_DIR}/{formats.BEST_WEIGHTS}", synthetic=False)
        atomic_write_json(out_dir / formats.SLIDE_EVAL, evaluation)
    return {"slides": scores, "eval": evaluation, "failed": failed}


def _write_slide_outputs(out_dir: Path, name: str, table: pd.DataFrame, tumor_probability: np.ndarray, job,
                         settings, export: tuple[str | None, bool, float] = (None, False, 0.5)) -> None:
    """tiles/<slide>.parquet (with probabilities), heatmaps/<slide>.png (with annotation outlines) and, with
    ``export`` (format, regions, threshold), annotations/<slide>.geojson|.xml for QuPath/ASAP."""
    from histotoken.data.wsi.annotations import read_annotations
    from histotoken.data.wsi.reader import open_slide
    from histotoken.data.wsi.thumbnails import heatmap, png_bytes
    from histotoken.data.wsi.tiling import parquet_bytes
    from histotoken.data.wsi.tissue import read_at_mpp

    atomic_write_bytes(out_dir / formats.SLIDE_PREDICTIONS_DIR / f"{name}.parquet", parquet_bytes(table))
    with open_slide(job.path, job.slide_mpp) as slide:
        # the tissue mask's own bounded read (blocks of the nearest level, shrunk as they arrive)
        image, _, scale = read_at_mpp(slide, settings.tissue.mask_mpp)
        size = settings.tile_size * slide.downsample_for(settings.resolution)
    annotations = read_annotations(job.annotation_path, job.label_map) if job.annotation_path else None
    picture = heatmap(image, scale, table["x"], table["y"], size, tumor_probability, annotations)
    atomic_write_bytes(out_dir / formats.SLIDE_HEATMAPS_DIR / f"{name}.png", png_bytes(picture))
    export_format, regions, threshold = export
    if export_format is not None:
        from histotoken.engine.annotations_export import write_annotation_export

        write_annotation_export(out_dir, name, table, size, export_format, tumor_probability, threshold, regions)
