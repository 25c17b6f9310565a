"""Figures of the study report, drawn with matplotlib's object API on the Agg canvas.

No pyplot: figures are plain ``matplotlib.figure.Figure`` objects, so building a report never
touches the user's interactive backend or pyplot's global figure list. Every function takes
tables (from :mod:`histotoken.reporting.tables`) and returns a Figure; ``figure_to_png`` turns
one into PNG bytes that the report both writes to ``figures/`` and inlines in the HTML.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg
from matplotlib.figure import Figure

DPI = 110
IN_DOMAIN_COLOR = "#3b6ea8"
CROSS_DOMAIN_COLOR = "#e08a2c"
FRONT_COLOR = "#c0392b"
JPEG_QUALITY = 88
PALETTE_MAX_MEAN_ERROR = 1.0  # grey levels (of 255), averaged over pixels and channels
MIN_FONT_PT = 7  # 7 pt at DPI 110 is 10.7 px on screen at 100% zoom
MAX_FIGURE_PX = 1140  # within the report's column (render.PAGE_COLUMN_PX): shown at 100%, never shrunk
# Every figure image states the font size of its smallest text, in the image's own pixels (pt * dpi / 72),
# under this key: a PNG text chunk, or a JPEG comment "key=value". A browser cannot measure text in a raster
# image; with this and the width the image is shown at, the size the reader sees can be computed.
SMALLEST_TEXT_KEY = "histotoken:smallest-text-px"


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


class _TextSizeRenderer(RendererAgg):
    """The Agg renderer, noting the size (points) of every non-empty text it draws."""

    def __init__(self, width: float, height: float, dpi: float) -> None:
        super().__init__(width, height, dpi)
        self.text_points: list[float] = []

    def draw_text(self, gc, x, y, s, prop, angle, ismath=False, mtext=None):
        if s.strip():
            self.text_points.append(float(prop.get_size_in_points()))
        return super().draw_text(gc, x, y, s, prop, angle, ismath=ismath, mtext=mtext)


class _TextSizeCanvas(FigureCanvasAgg):
    """An Agg canvas whose renderer records the text it draws (what was drawn, not what exists:
    tick labels of a hidden axis or a panel switched off do not count)."""

    def get_renderer(self) -> _TextSizeRenderer:
        width, height = self.figure.bbox.size
        key = (width, height, self.figure.dpi)
        if getattr(self, "_text_key", None) != key:
            self._text_renderer = _TextSizeRenderer(width, height, self.figure.dpi)
            self._text_key = key
        return self._text_renderer


def render_png(figure: Figure, dpi: float = DPI) -> tuple[bytes, float | None]:
    """The figure as PNG bytes, and the font size of its smallest drawn text in image pixels (None: no text)."""
    canvas = _TextSizeCanvas(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    points = canvas._text_renderer.text_points  # the renderer savefig drew with (at ``dpi``)
    return buffer.getvalue(), (min(points) * dpi / 72.0 if points else None)


def figure_to_png(figure: Figure, dpi: float = DPI) -> bytes:
    """A plot as a palette PNG: plots hold few colours, so 256 cost nothing visible and a third of the bytes.
    The PNG states its smallest text size (``SMALLEST_TEXT_KEY``)."""
    data, smallest = render_png(figure, dpi)
    return compress_image(data, photographic=False, smallest_text_px=smallest)[0]


def figure_to_jpeg(figure: Figure) -> bytes:
    """A figure of photographs (e.g. the dataset preview) as JPEG, stating its smallest text size."""
    data, smallest = render_png(figure)
    return compress_image(data, photographic=True, smallest_text_px=smallest)[0]


def state_smallest_text(png: bytes, smallest_text_px: float | None) -> bytes:
    """The same PNG (pixels untouched), stating its smallest text size under ``SMALLEST_TEXT_KEY``."""
    from PIL import Image, PngImagePlugin

    if smallest_text_px is None:
        return png
    info = PngImagePlugin.PngInfo()
    info.add_text(SMALLEST_TEXT_KEY, f"{smallest_text_px:.2f}")
    buffer = io.BytesIO()
    with Image.open(io.BytesIO(png)) as opened:
        opened.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def smallest_text_px(data: bytes) -> float | None:
    """The ``SMALLEST_TEXT_KEY`` an image states (PNG text chunk or JPEG comment), in its own pixels."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as opened:
        text = getattr(opened, "text", {}) if opened.format == "PNG" else {}
        value = text.get(SMALLEST_TEXT_KEY)
        comment = opened.info.get("comment", b"")
    if value is None and isinstance(comment, bytes) and comment.startswith(SMALLEST_TEXT_KEY.encode() + b"="):
        value = comment.split(b"=", 1)[1].decode("ascii")
    return float(value) if value not in (None, "") else None


def compress_image(data: bytes, photographic: bool | None = None,
                   smallest_text_px: float | None = None) -> tuple[bytes, str]:
    """Re-encode a PNG smaller where that costs nothing visible; returns (bytes, extension).

    Plots (``photographic=False``) become palette PNGs (Pillow's median-cut quantisation to 256
    colours, no dithering). Photographs (``True``) become JPEG at quality ``JPEG_QUALITY``. With
    ``None`` (a PNG written by another command), the palette is kept when its mean error is at most
    ``PALETTE_MAX_MEAN_ERROR`` grey levels, else JPEG. The original is kept when it is already smaller.
    The smallest text size (``smallest_text_px``, else the one ``data`` states) travels with the image.
    """
    from PIL import Image, PngImagePlugin

    with Image.open(io.BytesIO(data)) as opened:
        rgb = opened.convert("RGB")
        stated = opened.text.get(SMALLEST_TEXT_KEY) if opened.format == "PNG" else None
    if smallest_text_px is None and stated:
        smallest_text_px = float(stated)
    png_info, jpeg_comment = None, {}
    if smallest_text_px is not None:
        png_info = PngImagePlugin.PngInfo()
        png_info.add_text(SMALLEST_TEXT_KEY, f"{smallest_text_px:.2f}")
        jpeg_comment = {"comment": f"{SMALLEST_TEXT_KEY}={smallest_text_px:.2f}".encode("ascii")}
    # the original stays a candidate unless it would lose the statement of its text size
    candidates: list[tuple[bytes, str]] = [(data, "png")] if smallest_text_px is None or stated else []
    if photographic is not True:
        palette = rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        error = np.abs(np.asarray(palette.convert("RGB"), dtype=np.int16) - np.asarray(rgb, dtype=np.int16))
        if photographic is False or float(error.mean()) <= PALETTE_MAX_MEAN_ERROR:
            buffer = io.BytesIO()
            palette.save(buffer, format="PNG", optimize=True, pnginfo=png_info)
            candidates.append((buffer.getvalue(), "png"))
            photographic = False
    if photographic is not False:
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True, **jpeg_comment)
        candidates.append((buffer.getvalue(), "jpg"))
    return min(candidates, key=lambda candidate: len(candidate[0]))


def _annotate_cells(ax, values: np.ndarray, text: np.ndarray, colors: np.ndarray, vmax: float) -> None:
    """Write ``text`` in each cell, white on dark cells and black on light ones."""
    for (row, column), label in np.ndenumerate(text):
        if label == "":
            continue
        dark = not np.isnan(colors[row, column]) and colors[row, column] > 0.6 * vmax
        ax.text(column, row, label, ha="center", va="center", fontsize=8, color="white" if dark else "black")


def cross_domain_heatmaps(matrices: Mapping[str, pd.DataFrame], metric_label: str = "macro-F1") -> Figure:
    """One train (rows) x test (columns) heatmap per model, all on the same 0-1 colour scale."""
    n_panels = len(matrices)
    n_columns = min(n_panels, 3)
    n_rows = math.ceil(n_panels / n_columns)
    size = max(max(matrix.shape) for matrix in matrices.values())
    panel = 0.9 + 0.7 * size  # three panels side by side stay within MAX_FIGURE_PX
    figure = new_figure(panel * n_columns + 0.9, panel * n_rows + 0.3)
    axes = np.atleast_1d(figure.subplots(n_rows, n_columns, squeeze=False).ravel())
    image = None
    for ax, (title, matrix) in zip(axes, matrices.items()):
        values = matrix.to_numpy(dtype=float)
        image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0)
        text = np.where(np.isnan(values), "", np.vectorize(lambda v: f"{v:.2f}")(np.nan_to_num(values)))
        # viridis is dark at low values: invert the rule used by _annotate_cells.
        _annotate_cells(ax, values, text, 1.0 - values, vmax=1.0)
        ax.set_xticks(range(values.shape[1]), [str(c) for c in matrix.columns], rotation=30, ha="right")
        ax.set_yticks(range(values.shape[0]), [str(r) for r in matrix.index])
        ax.set_xlabel("test magnification")
        ax.set_ylabel("train magnification")
        ax.set_title(title, fontsize=9)
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    if image is not None:
        figure.colorbar(image, ax=list(axes[:n_panels]), shrink=0.8, label=metric_label)
    return figure


def in_vs_cross_bars(summary: pd.DataFrame, labels: Sequence[str]) -> Figure:
    """Grouped bars per model: mean in-domain vs mean cross-domain (off-diagonal) macro-F1."""
    figure = new_figure(max(4.0, 1.1 * len(labels) + 1.5), 3.6)
    ax = figure.subplots()
    positions = np.arange(len(labels))
    width = 0.38
    for offset, column, name, color in (
        (-width / 2, "in_domain_mean", "in-domain (train = test)", IN_DOMAIN_COLOR),
        (width / 2, "cross_domain_mean", "cross-domain (train != test)", CROSS_DOMAIN_COLOR),
    ):
        heights = summary[column].to_numpy(dtype=float)
        bars = ax.bar(positions + offset, np.nan_to_num(heights), width, label=name, color=color)
        ax.bar_label(bars, labels=["" if np.isnan(h) else f"{h:.2f}" for h in heights], fontsize=7, padding=2)
    ax.set_xticks(positions, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.22)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("mean macro-F1")
    ax.legend(fontsize=8, loc="upper center", ncol=2, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return figure


def pareto_scatter(
    table: pd.DataFrame, x: str, x_label: str, front: str, lower_x_is_better: bool
) -> Figure:
    """Macro-F1 against a cost column; models on the Pareto front are red and joined by a line."""
    figure = new_figure(5.8, 4.0)
    ax = figure.subplots()
    usable = table.dropna(subset=[x, "macro_f1"])
    on_front = usable[usable[front]]
    off_front = usable[~usable[front]]
    if len(off_front):
        ax.scatter(off_front[x], off_front["macro_f1"], color="#7f8c8d", s=36, label="dominated", zorder=3)
    ax.scatter(on_front[x], on_front["macro_f1"], color=FRONT_COLOR, s=48, marker="D",
               label="Pareto front", zorder=4)
    line = on_front.sort_values(x)
    ax.plot(line[x], line["macro_f1"], color=FRONT_COLOR, linewidth=1.2, linestyle="--", zorder=2)
    values = usable[x].to_numpy(dtype=float)
    log_scale = len(values) and values.min() > 0 and values.max() / values.min() > 20
    if log_scale:
        ax.set_xscale("log")
    scaled = np.log(values) if log_scale else values
    middle = (scaled.min() + scaled.max()) / 2 if len(scaled) else 0.0
    for position, (_, row) in zip(scaled, usable.iterrows()):
        right_half = position > middle  # label towards the centre so it stays inside the figure
        ax.annotate(str(row["model"]), (row[x], row["macro_f1"]), textcoords="offset points",
                    xytext=(-6, 5) if right_half else (6, 5), ha="right" if right_half else "left", fontsize=7)
    direction = "lower is better" if lower_x_is_better else "higher is better"
    ax.set_xlabel(f"{x_label} ({direction})")
    ax.set_ylabel("in-domain macro-F1 (higher is better)")
    ax.margins(x=0.18, y=0.15)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return figure


def confusion_matrix_figure(counts: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    """Counts in each cell; colour is the fraction of the row (per-class recall on the diagonal)."""
    counts = np.asarray(counts, dtype=float)
    n_classes = len(class_names)
    side = 2.2 + 0.55 * n_classes
    figure = new_figure(side + 0.8, side)
    ax = figure.subplots()
    row_totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, row_totals, out=np.zeros_like(counts), where=row_totals > 0)
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    text = np.vectorize(lambda v: f"{int(v)}")(counts)
    _annotate_cells(ax, counts, text, fractions, vmax=1.0)
    ax.set_xticks(range(n_classes), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n_classes), class_names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    figure.colorbar(image, ax=ax, shrink=0.7, label="fraction of the true class")
    return figure


def best_row(metrics: pd.DataFrame, best_epoch: int | None = None, best_stage: object = None) -> int | None:
    """Row of metrics.csv that holds the best epoch: the one whose ``epoch`` (and ``stage``, when known)
    is the run's recorded best (status.json ``best_epoch``, best.json ``stage``), the same field the
    report's text quotes; without a record, the row with the highest validation macro-F1."""
    if best_epoch is not None and "epoch" in metrics.columns:
        epochs = pd.to_numeric(metrics["epoch"], errors="coerce")
        match = epochs == int(best_epoch)
        if best_stage is not None and "stage" in metrics.columns:
            match &= metrics["stage"].astype(str) == str(best_stage)
        if match.any():
            return int(np.flatnonzero(match.to_numpy())[-1])
    if "val/macro_f1" in metrics.columns:
        f1 = pd.to_numeric(metrics["val/macro_f1"], errors="coerce").to_numpy(dtype=float)
        if not np.all(np.isnan(f1)):
            return int(np.nanargmax(f1))
    return None


def training_curves_figure(metrics: pd.DataFrame, title: str, best_epoch: int | None = None,
                           best_stage: object = None) -> Figure:
    """Loss (train, val) and validation macro-F1 per epoch; dotted lines where a new stage starts.

    Points are placed in file order; the tick labels are metrics.csv's own ``epoch`` numbers, so the
    star on the best epoch (:func:`best_row`) sits above the number the report's text gives. Legends
    sit below the axes, where they hide no point.
    """
    figure = new_figure(8.0, 3.4)
    loss_ax, f1_ax = figure.subplots(1, 2)
    positions = np.arange(1, len(metrics) + 1)  # rows across all stages, in file order
    if "epoch" in metrics.columns and pd.to_numeric(metrics["epoch"], errors="coerce").notna().all():
        tick_labels = [str(int(e)) for e in pd.to_numeric(metrics["epoch"])]
    else:
        tick_labels = [str(p) for p in positions]
    for column, name, style in (("train/loss", "train loss", "-"), ("val/loss", "val loss", "--")):
        if column in metrics.columns:
            loss_ax.plot(positions, pd.to_numeric(metrics[column], errors="coerce"), style, marker="o",
                         markersize=3, label=name)
    loss_ax.set_ylabel("loss")
    if "val/macro_f1" in metrics.columns:
        f1 = pd.to_numeric(metrics["val/macro_f1"], errors="coerce").to_numpy(dtype=float)
        f1_ax.plot(positions, f1, marker="o", markersize=3, color="#2e8b57", label="val macro-F1")
        best = best_row(metrics, best_epoch, best_stage)
        if best is not None and not np.isnan(f1[best]):
            f1_ax.plot(positions[best], f1[best], marker="*", markersize=13, color=FRONT_COLOR,
                       linestyle="none", label=f"best epoch ({tick_labels[best]})", zorder=5)
    f1_ax.set_ylabel("validation macro-F1")
    f1_ax.set_ylim(0, 1.02)
    starts: list[int] = []
    if "stage" in metrics.columns:
        stages = metrics["stage"].astype(str).tolist()
        starts = [i for i in range(len(stages)) if i == 0 or stages[i] != stages[i - 1]]
        if len(starts) > 1:
            for ax in (loss_ax, f1_ax):
                for start in starts[1:]:
                    ax.axvline(start + 0.5, color="#555555", linestyle=":", linewidth=1.2)
                for start in starts:  # row index `start` is position start + 1 on the axis
                    ax.annotate(f"stage {stages[start]}", (start + 1, 1.0), xycoords=("data", "axes fraction"),
                                xytext=(0, 3), textcoords="offset points", ha="left", va="bottom",
                                fontsize=MIN_FONT_PT, color="#555555")
    for ax in (loss_ax, f1_ax):
        ax.set_xlabel("epoch (within each stage)" if len(starts) > 1 else "epoch")
        ax.grid(alpha=0.3)
        ax.set_xticks(positions, tick_labels)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=MIN_FONT_PT + 1, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
                      frameon=False)
    figure.suptitle(title, fontsize=9)
    return figure


def image_grid_figure(
    thumbnails: Mapping[tuple[str, str], Sequence[np.ndarray | None]],
    classes: Sequence[str],
    magnifications: Sequence[str],
    per_cell: int,
    cell_px: tuple[int, int] = (96, 64),
    column_labels: Sequence[str] | None = None,
) -> Figure:
    """Rows are classes, columns magnifications x ``per_cell`` examples; missing images are grey.

    ``column_labels`` name the column groups (default ``"<magnification>x"``; data without
    magnifications pass one group with its own label).

    The thumbnails are pasted into one mosaic drawn by a single ``imshow`` (one axes instead of
    one per image keeps the figure fast to lay out).
    """
    width, height, gap = cell_px[0], cell_px[1], 4
    n_columns = len(magnifications) * per_cell
    mosaic = np.full(
        (len(classes) * (height + gap) + gap, n_columns * (width + gap) + gap, 3), 255, dtype=np.uint8
    )
    for row, tumor_class in enumerate(classes):
        for m, magnification in enumerate(magnifications):
            images = list(thumbnails.get((tumor_class, magnification), []))
            for k in range(per_cell):
                top = gap + row * (height + gap)
                left = gap + (m * per_cell + k) * (width + gap)
                cell = mosaic[top:top + height, left:left + width]
                cell[:] = 225
                image = images[k] if k < len(images) else None
                if image is not None:
                    image = _fit(image, width, height)
                    cell[: image.shape[0], : image.shape[1]] = image
    figure = new_figure(0.011 * mosaic.shape[1] + 1.8, 0.011 * mosaic.shape[0] + 0.5)
    figure.get_layout_engine().set(w_pad=0.12)  # room for the longest class name
    ax = figure.subplots()
    ax.imshow(mosaic, interpolation="nearest")
    group_width = per_cell * (width + gap)
    ax.set_xticks([gap + (m + 0.5) * group_width for m in range(len(magnifications))],
                  list(column_labels or [f"{magnification}x" for magnification in magnifications]), fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([gap + (row + 0.5) * (height + gap) for row in range(len(classes))],
                  [tumor_class.replace("_", " ") for tumor_class in classes], fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return figure


def _fit(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Crop an RGB array to at most ``height`` x ``width`` (thumbnails are already about that size)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[:height, :width, :3]
