"""The slide report: what ``histotoken predict RUN_DIR SLIDES --out DIR`` found, from its files alone.

Reads DIR/slides.csv (slide scores), DIR/eval.json (with slide labels: slide- and tile-level
metrics), DIR/tiling/thumbnails/<slide>.png (tissue contour and the tiles that were scored) and
DIR/heatmaps/<slide>.png (tumour probability, annotation outlines drawn), and writes
DIR/report.html (self-contained) and DIR/report.md. Each slide's thumbnail and heatmap stand
side by side, so that the model's map can be read against the tissue and the annotations; the heatmap
has a colour bar with the probability scale and the thumbnail a legend of its outline colours.
DIR/prediction.json (the run, the classes, the decision threshold and the slide score) gives the
title and the threshold paragraph.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from histotoken import formats
from histotoken.io import read_json
from histotoken.reporting.blocks import FigureBlock, Note, Paragraph, Section, Table
from histotoken.reporting.formatting import file_name, format_estimate, format_number
from histotoken.reporting.render import write_report

logger = logging.getLogger(__name__)

SLIDE_METRICS = ("auroc", "accuracy", "balanced_accuracy", "macro_f1")
HEATMAP_COLORMAP = "jet"  # the colour map of histotoken.data.wsi.thumbnails.heatmap
PROBABILITY_LABEL = "tumour probability"
SLIDE_SCORE_WORDS = {
    "max": "score_max, the highest tumour probability of any tile",
    "topk_mean": "score_topk_mean, the mean of the {top_k} highest tile tumour probabilities",
}


def outline_legend() -> list[tuple[str, tuple[int, int, int]]]:
    """(meaning, RGB colour) of every outline drawn on the thumbnails and heatmaps."""
    from histotoken.data.wsi.thumbnails import ANNOTATION_COLOUR, TILE_COLOURS, TISSUE_COLOUR

    return [
        ("tissue outline", TISSUE_COLOUR),
        ("tile labelled tumour (annotations or slide label)", TILE_COLOURS["tumor"]),
        ("tile labelled normal", TILE_COLOURS["normal"]),
        ("tile without a label", TILE_COLOURS[""]),
        ("annotated tumour region (heatmap)", ANNOTATION_COLOUR),
    ]


def slide_figure(left: Path, right: Path, titles: tuple[str, str]):
    """The thumbnail (left, with a legend of its outline colours below) and the heatmap (right, with a colour
    bar of the tumour probability from 0 to 1) as a matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    pictures = [plt.imread(path) if path.is_file() else None for path in (left, right)]
    # as tall as the pictures need at 4.7 in wide each (no band of white above and below a wide slide),
    # plus the titles and the legend
    aspect = max((picture.shape[0] / picture.shape[1] for picture in pictures if picture is not None), default=0.6)
    figure, axes = plt.subplots(1, 2, figsize=(11, min(9.0, max(3.2, 4.7 * aspect + 1.5))), layout="constrained")
    for axis, picture, path, title in zip(axes, pictures, (left, right), titles):
        axis.set_title(title, fontsize=11)
        axis.axis("off")
        if picture is not None:
            axis.imshow(picture)
        else:
            axis.text(0.5, 0.5, f"{path.name} is missing", ha="center", va="center")
    handles = [Patch(facecolor="none", edgecolor=tuple(c / 255 for c in colour), linewidth=2, label=meaning)
               for meaning, colour in outline_legend()]
    figure.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=10, frameon=False,
                  title="outlines", title_fontsize=10)
    add_colour_bar(figure, PROBABILITY_LABEL, ax=axes[1])
    return figure


def add_colour_bar(figure, label: str, ax=None, cax=None):
    """The heatmaps' colour bar (``HEATMAP_COLORMAP`` from 0 to 1, labelled ``label``) beside ``ax`` or in ``cax``:
    the one scale of every heatmap drawn by ``histotoken.data.wsi.thumbnails.heatmap``."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    placement = {"cax": cax} if cax is not None else {"ax": ax, "shrink": 0.9, "aspect": 25, "pad": 0.02}
    colour_bar = figure.colorbar(ScalarMappable(Normalize(0.0, 1.0), colormaps[HEATMAP_COLORMAP]), **placement)
    colour_bar.set_label(label, fontsize=10)
    colour_bar.ax.tick_params(labelsize=10)
    return colour_bar


def heatmap_with_colour_bar(picture, label: str, dpi: float = 100.0) -> bytes:
    """A heatmap picture (RGB array or PIL image, e.g. from ``thumbnails.heatmap``) as PNG bytes with its colour bar
    on the right: the picture's pixels are copied unscaled to the top-left corner (rows ``0:h``, columns ``0:w``
    of the PNG are the picture), so the PNG can be read against the slide's thumbnail pixel by pixel."""
    import numpy as np
    from matplotlib.figure import Figure

    from histotoken.reporting.plots import render_png, state_smallest_text

    image = np.asarray(picture)
    height, width = image.shape[:2]
    bar_width, min_height = 120, 240  # pixels: room for the colour bar and its label at 10 pt
    figure_height = max(height, min_height)
    figure = Figure(figsize=((width + bar_width) / dpi, figure_height / dpi), dpi=dpi)  # no pyplot state
    figure.figimage(image, xo=0, yo=figure_height - height, origin="upper")  # pixel for pixel, top-left
    left = (width + 12) / (width + bar_width)
    cax = figure.add_axes((left, 0.08, 16 / (width + bar_width), 0.84))
    add_colour_bar(figure, label, cax=cax)
    png, smallest = render_png(figure, dpi=dpi)
    return state_smallest_text(png, smallest)


def side_by_side(left: Path, right: Path, titles: tuple[str, str]) -> bytes:
    """:func:`slide_figure` as PNG bytes."""
    import matplotlib.pyplot as plt

    from histotoken.reporting.plots import render_png, state_smallest_text

    figure = slide_figure(left, right, titles)
    png, smallest = render_png(figure, dpi=90)  # the PNG states its smallest text (for the readability test)
    plt.close(figure)
    return state_smallest_text(png, smallest)


def read_prediction(out_dir: Path) -> dict:
    """OUT/prediction.json (the run, the threshold), or what eval.json records of it in older folders."""
    path = out_dir / formats.SLIDE_PREDICTION
    if path.is_file():
        return read_json(path)
    eval_path = out_dir / formats.SLIDE_EVAL
    evaluation = read_json(eval_path) if eval_path.is_file() else {}
    run_dir = evaluation.get("run_dir")
    return {key: evaluation[key] for key in ("model_name", "threshold", "slide_score", "top_k") if key in evaluation} | (
        {"run_id": Path(run_dir).name} if run_dir else {})


def threshold_paragraph(prediction: dict) -> Paragraph | Note:
    """The decision threshold, the score it applies to, and how it was chosen."""
    if "threshold" not in prediction:
        return Note("The decision threshold is not recorded in this folder (it predates prediction.json); "
                    "run `histotoken predict` again to state it.")
    score = SLIDE_SCORE_WORDS.get(prediction.get("slide_score", "max"), "the slide score").format(
        top_k=prediction.get("top_k", "k"))
    how = ("histotoken's fixed default, set before seeing any slide; it was not tuned on validation slides, "
           "so a run whose probabilities are not calibrated may be better served by another threshold "
           "(the AUROC does not depend on it)"
           if prediction.get("threshold_source", "default") == "default"
           else "given by the caller of histotoken.engine.slides.predict_slides, not chosen by histotoken")
    return Paragraph(
        f"Decision threshold: a slide is called tumour when its {score} is at least "
        f"{format_number(prediction['threshold'], 2)}. How it was chosen: {how}. Tile classes in exported "
        "annotations are each tile's most probable class."
    )


def report_title(out_dir: Path, prediction: dict, slides: list[str]) -> str:
    """The run (model, run id) and the slides; the folder's name only where the run is not recorded."""
    shown = ", ".join(slides[:3]) + (f" and {len(slides) - 3} more" if len(slides) > 3 else "")
    noun = "slide" if len(slides) == 1 else "slides"
    if "model_name" in prediction:
        run = f"{prediction['model_name']} (run {prediction.get('run_id', '?')})"
        return f"Slide predictions of {run} on {len(slides)} {noun}: {shown}"
    return f"Slide predictions in {out_dir.resolve().name} on {len(slides)} {noun}: {shown}"


def annotated_slides(out_dir: Path) -> set[str]:
    """Slides tiled with an annotation file (OUT/tiling/summary.csv's annotations column)."""
    summary = formats.TilePaths(out_dir / "tiling").summary
    if not summary.is_file():
        return set()
    table = pd.read_csv(summary, dtype=str, keep_default_na=False)
    if "annotations" not in table.columns:
        return set()
    return set(table.loc[table["annotations"] != "", "slide"])


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
        threshold_paragraph(read_prediction(out_dir)),
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
    annotated = annotated_slides(out_dir)
    figures = []
    for slide in scores["slide"]:
        thumbnail = formats.TilePaths(out_dir / "tiling").thumbnail(slide)
        heatmap = out_dir / formats.SLIDE_HEATMAPS_DIR / f"{slide}.png"
        outlined = slide in annotated
        right_title = "tumour probability, annotations outlined" if outlined else "tumour probability"
        figures.append(FigureBlock(
            name=f"slide_{file_name(slide)}.png",
            png=side_by_side(thumbnail, heatmap, ("tissue and scored tiles", right_title)),
            caption=f"{slide}" + ("" if outlined else " (no annotations)"),
            how_to_read=(
                "Left: the slide at low resolution, tissue outlined in green and the scored tiles drawn in red "
                "(labelled tumour), blue (labelled normal) or grey (no label), as the legend below says. Right: "
                "each tile coloured by the model's tumour probability on the colour bar's scale, from dark blue (0) "
                "to dark red (1)"
                + (", with the annotated tumour regions outlined in black. A good model lights up inside the "
                   "outlines and stays dark elsewhere." if outlined else
                   ". A good model lights up on tumour and stays dark blue elsewhere.")
            ),
        ))
    if annotated:
        sections.append(Section("heatmaps", "Heatmaps next to the annotations", figures))
    else:
        sections.append(Section("heatmaps", "Heatmaps", [
            Note("No annotations were given (--annotations DIR), so no tumour regions are outlined."), *figures,
        ]))
    return sections


def build_slide_report(out_dir: str | Path) -> Path:
    """Write OUT/report.html and OUT/report.md (+ figures/) from a slide-prediction folder; return the HTML path."""
    out_dir = Path(out_dir)
    sections = slide_sections(out_dir)
    slides = list(pd.read_csv(out_dir / formats.SLIDE_SCORES, dtype={"slide": str}, keep_default_na=False)["slide"])
    title = report_title(out_dir, read_prediction(out_dir), slides)
    out = write_report(out_dir, title, sections, None)
    logger.info("wrote %s", out)
    return out
