"""The explanation figures, drawn with matplotlib's object API (no pyplot), each readable alone.

Every function takes arrays and returns a ``matplotlib.figure.Figure``; images are uint8
(n, H, W, 3) and maps (n, gh, gw) normalised over the patch grid (see :mod:`histotoken.explain.maps`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from histotoken.reporting.plots import DPI, new_figure

OVERLAY_ALPHA = 0.5
CELL_IN = 1.25


def _grid_figure(width: float, height: float) -> Figure:
    """A figure for many small image axes: a fixed layout (constrained layout is slow with dozens of axes)."""
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _show_overlay(ax, image: np.ndarray, saliency: np.ndarray | None, cmap: str = "jet") -> None:
    """The image, and over it the map on its own colour scale: lowest value blue, highest red."""
    height, width = image.shape[:2]
    ax.imshow(image, extent=(0, width, height, 0))
    if saliency is not None:
        low, high = float(saliency.min()), float(saliency.max())
        shown = (saliency - low) / (high - low) if high > low else np.zeros_like(saliency)
        ax.imshow(shown, cmap=cmap, alpha=OVERLAY_ALPHA, vmin=0, vmax=1, extent=(0, width, height, 0),
                  interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])


def per_image_figure(images: np.ndarray, maps: Mapping[str, np.ndarray], captions: Sequence[str],
                     groups_per_row: int = 2) -> Figure:
    """Each image, then one overlay per method, ``groups_per_row`` images side by side; captions say true/predicted."""
    methods = list(maps)
    panels = 1 + len(methods)
    rows = int(np.ceil(len(images) / groups_per_row))
    columns = panels * groups_per_row
    figure = _grid_figure(CELL_IN * columns + 1.2 * groups_per_row, (CELL_IN + 0.35) * rows + 0.5)
    axes = np.atleast_2d(figure.subplots(rows, columns, squeeze=False))
    figure.subplots_adjust(left=0.02, right=0.99, top=1 - 0.4 / figure.get_figheight(), bottom=0.02,
                           wspace=0.05, hspace=0.45)
    for ax in axes.flat:
        ax.set_axis_off()
    for index, image in enumerate(images):
        row, group = divmod(index, groups_per_row)
        first = axes[row, group * panels]
        first.set_axis_on()
        _show_overlay(first, image, None)
        first.set_title(captions[index], fontsize=6)
        for offset, method in enumerate(methods, start=1):
            ax = axes[row, group * panels + offset]
            ax.set_axis_on()
            _show_overlay(ax, image, maps[method][index])
            if index < groups_per_row:
                ax.set_title(method, fontsize=8, fontweight="bold")
    return figure


def outcome_grid_figure(
    cells: Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray, str] | None],
    classes: Sequence[str],
    outcomes: Sequence[str],
    method: str,
) -> Figure:
    """Rows are classes, columns outcomes (TP/FP/FN); each cell the most confident such image with its map."""
    figure = _grid_figure(CELL_IN * len(outcomes) + 1.6, (CELL_IN + 0.2) * len(classes) + 0.7)
    axes = np.atleast_2d(figure.subplots(len(classes), len(outcomes), squeeze=False))
    figure.subplots_adjust(left=0.3, right=0.98, top=1 - 0.55 / figure.get_figheight(), bottom=0.03, hspace=0.35)
    for row, name in enumerate(classes):
        for column, outcome in enumerate(outcomes):
            ax = axes[row, column]
            cell = cells.get((name, outcome))
            if cell is None:
                ax.set_facecolor("#eeeeee")
                ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=7, color="#777777",
                        transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                image, saliency, caption = cell
                _show_overlay(ax, image, saliency)
                ax.set_xlabel(caption, fontsize=6)
            if column == 0:
                ax.set_ylabel(name.replace("_", " "), fontsize=7, rotation=0, ha="right", va="center")
            if row == 0:
                ax.set_title(outcome, fontsize=8)
    figure.suptitle(f"{method}: most confident images per class and outcome", fontsize=9)
    return figure


def token_maps_figure(images: np.ndarray, maps: np.ndarray, title: str) -> Figure:
    """One row per image: the image, then the S TokenLearner maps (each on its own colour scale)."""
    rows, count = maps.shape[0], maps.shape[1]
    figure = _grid_figure(CELL_IN * 0.8 * (count + 1) + 0.4, CELL_IN * 0.8 * rows + 0.7)
    axes = np.atleast_2d(figure.subplots(rows, count + 1, squeeze=False))
    figure.subplots_adjust(left=0.02, right=0.98, top=1 - 0.55 / figure.get_figheight(), bottom=0.02)
    for row in range(rows):
        _show_overlay(axes[row, 0], images[row], None)
        for token in range(count):
            _show_overlay(axes[row, token + 1], images[row], maps[row, token], cmap="magma")
    axes[0, 0].set_title("image", fontsize=7)
    for token in range(count):
        axes[0, token + 1].set_title(f"token {token + 1}", fontsize=7)
    figure.suptitle(title, fontsize=9)
    return figure


def kept_patches_figure(images: np.ndarray, importance: np.ndarray, kept: np.ndarray) -> Figure:
    """One row per image: image, the scorer's importance map, and the image with the pruned patches greyed."""
    rows = len(images)
    figure = _grid_figure(CELL_IN * 3 + 0.4, (CELL_IN + 0.2) * rows + 0.5)
    axes = np.atleast_2d(figure.subplots(rows, 3, squeeze=False))
    figure.subplots_adjust(left=0.03, right=0.97, top=1 - 0.35 / figure.get_figheight(), bottom=0.03, hspace=0.3)
    for row in range(rows):
        image = images[row]
        _show_overlay(axes[row, 0], image, None)
        _show_overlay(axes[row, 1], image, importance[row])
        cell_h, cell_w = image.shape[0] / kept.shape[1], image.shape[1] / kept.shape[2]
        mask = np.kron(kept[row].astype(float), np.ones((int(np.ceil(cell_h)), int(np.ceil(cell_w)))))
        mask = mask[: image.shape[0], : image.shape[1], None]
        _show_overlay(axes[row, 2], (image * (0.25 + 0.75 * mask)).astype(np.uint8), None)
        axes[row, 2].set_xlabel(f"{int(kept[row].sum())} of {kept[row].size} patches kept", fontsize=6)
    for column, title in enumerate(("image", "scorer importance", "patches the ViT read")):
        axes[0, column].set_title(title, fontsize=8)
    return figure


def merge_sources_figure(images: np.ndarray, holders: np.ndarray) -> Figure:
    """One row per image: the image and its patches coloured by the merged token that holds them."""
    rows = len(images)
    figure = _grid_figure(CELL_IN * 2 + 0.4, (CELL_IN + 0.2) * rows + 0.5)
    axes = np.atleast_2d(figure.subplots(rows, 2, squeeze=False))
    figure.subplots_adjust(left=0.03, right=0.97, top=1 - 0.35 / figure.get_figheight(), bottom=0.03, hspace=0.3)
    for row in range(rows):
        image = images[row]
        height, width = image.shape[:2]
        _show_overlay(axes[row, 0], image, None)
        axes[row, 1].imshow(image, extent=(0, width, height, 0))
        labels = holders[row].astype(float)
        # Shuffle token ids so that neighbouring tokens get distinct colours.
        palette = np.random.default_rng(0).permutation(int(labels.max()) + 1) if labels.max() >= 0 else np.zeros(1)
        shown = np.where(labels >= 0, palette[np.maximum(labels, 0).astype(int)], np.nan)
        axes[row, 1].imshow(shown, cmap="tab20", alpha=0.6, extent=(0, width, height, 0), interpolation="nearest")
        axes[row, 1].set_xticks([])
        axes[row, 1].set_yticks([])
        axes[row, 1].set_xlabel(f"{len(np.unique(labels[labels >= 0]))} tokens", fontsize=6)
    axes[0, 0].set_title("image", fontsize=8)
    axes[0, 1].set_title("merged tokens", fontsize=8)
    return figure


def tsne_figure(embedding: np.ndarray, classes: Sequence[str], magnifications: Sequence[str], title: str) -> Figure:
    """Two panels of the same 2-D embedding: points coloured by class, and by magnification."""
    figure = new_figure(10.0, 4.6)
    axes = figure.subplots(1, 2)
    for ax, labels, name in ((axes[0], classes, "tumour class"), (axes[1], magnifications, "magnification")):
        labels = np.asarray([str(label) for label in labels])
        for index, value in enumerate(sorted(set(labels), key=_natural_key)):
            chosen = labels == value
            ax.scatter(embedding[chosen, 0], embedding[chosen, 1], s=10, alpha=0.8,
                       color=_colour(index), label=value.replace("_", " ") + ("x" if name == "magnification" else ""))
        ax.set_title(f"coloured by {name}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=6, markerscale=1.2, loc="best", frameon=False)
    figure.suptitle(title, fontsize=10)
    return figure


def faithfulness_figure(curves: Mapping[str, Mapping[str, np.ndarray]], random_name: str) -> Figure:
    """Mean deletion (left) and insertion (right) curves per method; the random-order curve dashed in grey."""
    figure = new_figure(9.0, 3.6)
    axes = figure.subplots(1, 2)
    for ax, kind in zip(axes, ("deletion", "insertion")):
        for index, (method, by_kind) in enumerate(curves.items()):
            values = by_kind[kind]
            fractions = np.linspace(0, 1, len(values))
            if method == random_name:
                ax.plot(fractions, values, "--", color="#888888", label="random order")
            else:
                ax.plot(fractions, values, "-o", markersize=2.5, color=_colour(index), label=method)
        verb = "removed (blurred)" if kind == "deletion" else "revealed"
        ax.set_xlabel(f"fraction of patches {verb}")
        ax.set_ylabel("probability of the predicted class")
        ax.set_ylim(0, 1.02)
        better = "lower" if kind == "deletion" else "higher"
        ax.set_title(f"{kind} ({better} area is better)", fontsize=9)
        ax.legend(fontsize=7, frameon=False)
    return figure


def _colour(index: int) -> str:
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
               "#bcbd22", "#7f7f7f"]
    return palette[index % len(palette)]


def _natural_key(text: str) -> tuple:
    return (0, int(text), "") if text.isdigit() else (1, 0, text)
