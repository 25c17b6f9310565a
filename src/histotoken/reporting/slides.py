"""The slide report: what ``histotoken predict RUN_DIR SLIDES --out DIR`` found, from its files alone.

Reads DIR/slides.csv (slide scores), DIR/eval.json (with slide labels: slide- and tile-level
metrics), DIR/tiling/thumbnails/<slide>.png (tissue contour and the tiles that were scored) and
DIR/heatmaps/<slide>.png (tumour probability, annotation outlines drawn), and writes
DIR/report.html (self-contained) and DIR/report.md. Each slide's thumbnail and heatmap stand
side by side, so that the model's map can be read against the tissue and the annotations.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pandas as pd

from histotoken import formats
from histotoken.io import atomic_write_bytes, atomic_write_text, read_json
from histotoken.reporting.blocks import FigureBlock, Note, Paragraph, Section, Table
from histotoken.reporting.formatting import file_name, format_estimate, format_number
from histotoken.reporting.render import collect_figures, render_html, render_markdown

logger = logging.getLogger(__name__)

SLIDE_METRICS = ("auroc", "accuracy", "balanced_accuracy", "macro_f1")


def side_by_side(left: Path, right: Path, titles: tuple[str, str]) -> bytes:
    """Two PNG files in one figure, left and right, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 5))
    for axis, path, title in zip(axes, (left, right), titles):
        axis.set_title(title, fontsize=10)
        axis.axis("off")
        if path.is_file():
            axis.imshow(plt.imread(path))
        else:
            axis.text(0.5, 0.5, f"{path.name} is missing", ha="center", va="center")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def metrics_table(evaluation: dict, level: str) -> Table:
    """Slide- or tile-level metrics with their 95% intervals (bootstrap over slides)."""
    intervals = evaluation.get("ci95") or {}
    rows = []
    for metric in SLIDE_METRICS:
        if metric not in evaluation:
            continue
        low, high = intervals.get(metric) or (float("nan"), float("nan"))
        rows.append({"metric": metric.replace("_", " "), "value [95% interval]": format_estimate(evaluation[metric], low, high)})
    caption = f"{level}: intervals from {evaluation.get('n_bootstrap', 0)} bootstrap resamples of slides"
    if not intervals:
        caption = f"{level}: no intervals (computed with --bootstrap 0)"
    return Table(pd.DataFrame(rows), caption)


def slide_sections(out_dir: Path) -> list[Section]:
    scores_path = out_dir / formats.SLIDE_SCORES
    if not scores_path.is_file():
        raise FileNotFoundError(
            f"{out_dir} holds no slide predictions ({formats.SLIDE_SCORES}); run "
            f"`histotoken predict RUN_DIR SLIDES... --out {out_dir}` first"
        )
    scores = pd.read_csv(scores_path, dtype={"slide": str, "slide_label": str, "patient_id": str}, keep_default_na=False)
    shown = scores.copy()
    for column in ("score_max", "score_topk_mean"):
        shown[column] = shown[column].map(lambda value: format_number(value, 3))
    sections = [Section("slides", "Slide scores", [
        Paragraph(
            "One row per slide: the tiles scored, the highest tumour probability of any tile (score_max), the "
            "mean of the top-k tiles (score_topk_mean), the call at the threshold, and the reference label where "
            "a labels CSV was given."
        ),
        Table(shown),
    ])]
    eval_path = out_dir / formats.SLIDE_EVAL
    if eval_path.is_file():
        evaluation = read_json(eval_path)
        blocks = [metrics_table(evaluation, f"slide level ({evaluation.get('n_slides', '?')} slides)")]
        if evaluation.get("tile_level"):
            blocks.append(metrics_table(evaluation["tile_level"], "tile level (tiles with annotation labels)"))
        sections.append(Section("metrics", "Slide- and tile-level metrics", blocks))
    else:
        sections.append(Section("metrics", "Slide- and tile-level metrics", [
            Note("No slide labels were given (--labels), so no metrics were computed."),
        ]))
    figures = []
    for slide in scores["slide"]:
        thumbnail = formats.TilePaths(out_dir / "tiling").thumbnail(slide)
        heatmap = out_dir / formats.SLIDE_HEATMAPS_DIR / f"{slide}.png"
        figures.append(FigureBlock(
            name=f"slide_{file_name(slide)}.png",
            png=side_by_side(thumbnail, heatmap, ("tissue and scored tiles", "tumour probability, annotations outlined")),
            caption=f"{slide}",
            how_to_read=(
                "Left: the slide at low resolution, tissue outlined and the scored tiles drawn. Right: each tile "
                "coloured by the model's tumour probability, with the annotated tumour regions outlined. A good "
                "model lights up inside the outlines and stays dark elsewhere."
            ),
        ))
    sections.append(Section("heatmaps", "Heatmaps next to the annotations", figures))
    return sections


def build_slide_report(out_dir: str | Path) -> Path:
    """Write OUT/report.html and OUT/report.md (+ figures/) from a slide-prediction folder; return the HTML path."""
    out_dir = Path(out_dir)
    sections = slide_sections(out_dir)
    title = f"histotoken slide predictions: {out_dir.resolve().name}"
    for figure in collect_figures(sections):
        atomic_write_bytes(out_dir / formats.FIGURES_DIR / figure.name, figure.png)
    out = out_dir / formats.REPORT_HTML
    atomic_write_text(out.with_suffix(".md"), render_markdown(title, sections, None))
    atomic_write_text(out, render_html(title, sections, None))
    logger.info("wrote %s", out)
    return out
