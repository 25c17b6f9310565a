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
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 110
IN_DOMAIN_COLOR = "#3b6ea8"
CROSS_DOMAIN_COLOR = "#e08a2c"
FRONT_COLOR = "#c0392b"


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def figure_to_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


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
    panel = 1.0 + 0.75 * size
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


def training_curves_figure(metrics: pd.DataFrame, title: str) -> Figure:
    """Loss (train, val) and validation macro-F1 per epoch; dashed lines where a new stage starts."""
    figure = new_figure(8.0, 3.2)
    loss_ax, f1_ax = figure.subplots(1, 2)
    epochs = np.arange(1, len(metrics) + 1)  # epochs across all stages, in file order
    for column, name, style in (("train/loss", "train loss", "-"), ("val/loss", "val loss", "--")):
        if column in metrics.columns:
            loss_ax.plot(epochs, pd.to_numeric(metrics[column], errors="coerce"), style, marker="o",
                         markersize=3, label=name)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    if "val/macro_f1" in metrics.columns:
        f1 = pd.to_numeric(metrics["val/macro_f1"], errors="coerce").to_numpy(dtype=float)
        f1_ax.plot(epochs, f1, marker="o", markersize=3, color="#2e8b57", label="val macro-F1")
        if not np.all(np.isnan(f1)):
            best = int(np.nanargmax(f1))
            f1_ax.plot(epochs[best], f1[best], marker="*", markersize=12, color=FRONT_COLOR,
                       linestyle="none", label="best")
    f1_ax.set_xlabel("epoch")
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
                for start in starts:  # row index `start` is epoch start + 1 on the axis
                    ax.annotate(f"stage {stages[start]}", (start + 1, 1.0), xycoords=("data", "axes fraction"),
                                xytext=(0, 3), textcoords="offset points", ha="left", va="bottom",
                                fontsize=7, color="#555555")
    for ax in (loss_ax, f1_ax):
        if len(starts) > 1:
            ax.set_xlabel("epoch (all stages, in order)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center right")
        ax.set_xticks(epochs)
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
