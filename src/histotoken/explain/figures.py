"""The explanation figures, drawn with matplotlib's object API (no pyplot), each readable alone.

Every function takes arrays and returns a ``matplotlib.figure.Figure``; images are uint8
(n, H, W, 3) and maps (n, gh, gw) normalised over the patch grid (see :mod:`histotoken.explain.maps`).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from histotoken.reporting.plots import DPI, MAX_FIGURE_PX, MIN_FONT_PT, new_figure

OVERLAY_ALPHA = 0.5
CELL_IN = 1.25  # inches per image cell
OUTCOME_COLUMNS = 3  # panels per row of the outcome grid
ROW_LABEL_IN = 1.4
SUPTITLE_PT = 9
TITLE_PT = 8  # column titles; captions and row labels are MIN_FONT_PT
TEXT_LINE_HEIGHT = 1.3  # a line of text, as a multiple of its font size


def overlay(image: np.ndarray, saliency: np.ndarray | None, cmap: str = "jet") -> np.ndarray:
    """uint8 (H, W, 3) image blended with a (H, W) map on its own scale (lowest blue, highest red for jet)."""
    if saliency is None:
        return image
    low, high = float(saliency.min()), float(saliency.max())
    shown = (saliency - low) / (high - low) if high > low else np.zeros_like(saliency, dtype=float)
    colours = colormaps[cmap](shown)[..., :3] * 255.0
    return (image * (1 - OVERLAY_ALPHA) + colours * OVERLAY_ALPHA).astype(np.uint8)


def mosaic_figure(
    tiles: Sequence[Sequence[np.ndarray]],
    captions: Sequence[Sequence[str]] | None = None,
    column_titles: Sequence[str] = (),
    row_labels: Sequence[str] = (),
    title: str = "",
    cell_in: float = CELL_IN,
) -> Figure:
    """A grid of equally sized image tiles drawn as one image (fast), with captions above the tiles.

    ``tiles[row][column]`` is a uint8 (H, W, 3) array; a row may be shorter than the others (its end stays
    white: the grid has no placeholder cells). Each tile is ``cell_in`` inches wide; all text is at least
    ``MIN_FONT_PT`` points, and the space above each tile fits its caption's lines at that size.
    """
    rows, columns = len(tiles), max(len(row) for row in tiles)
    height, width = tiles[0][0].shape[:2]
    has_captions = any(c for row in (captions or []) for c in row)
    gap_x = max(2, width // (10 if has_captions else 16))  # captions a little wider than their tile stay apart
    label_in = ROW_LABEL_IN if row_labels else 0.1
    # a wide grid gets narrower cells rather than being shrunk by the page (which would shrink its text)
    cell_in = min(cell_in, (MAX_FIGURE_PX / DPI - label_in) / (columns * (width + gap_x) / width))
    px_per_in = width / cell_in  # mosaic pixels per inch of figure

    def text_px(points: float, lines: int) -> int:  # the height of `lines` lines of text, in mosaic pixels
        return int(np.ceil(lines * points * TEXT_LINE_HEIGHT / 72.0 * px_per_in))

    caption_lines = max((c.count("\n") + 1 for row in (captions or []) for c in row if c), default=0)
    gap_y = gap_x + text_px(MIN_FONT_PT, caption_lines)  # room for the caption above each tile
    top = text_px(TITLE_PT, 1) + gap_x if column_titles else 0
    mosaic = np.full((top + rows * (height + gap_y), columns * (width + gap_x), 3), 255, dtype=np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            y, x = top + r * (height + gap_y) + gap_y, c * (width + gap_x)
            mosaic[y:y + height, x:x + width] = tile[:height, :width]
    figure_width = cell_in * columns * (width + gap_x) / width + label_in
    # a title wider than a narrow grid wraps (DejaVu Sans averages under 0.6 em per character)
    title = textwrap.fill(title, max(16, int(figure_width * 72 / (SUPTITLE_PT * 0.6)))) if title else ""
    title_in = (0.12 + (title.count("\n") + 1) * SUPTITLE_PT * TEXT_LINE_HEIGHT / 72) if title else 0.05
    figure_height = cell_in * mosaic.shape[0] / width + title_in
    figure = Figure(figsize=(figure_width, figure_height), dpi=DPI)
    FigureCanvasAgg(figure)
    ax = figure.add_axes((label_in / figure_width, 0.0, 1 - label_in / figure_width - 0.005,
                          1 - title_in / figure_height))
    ax.imshow(mosaic, interpolation="nearest", aspect="equal")
    ax.set_axis_off()
    for r, row in enumerate(tiles):
        for c, _ in enumerate(row):
            y, x = top + r * (height + gap_y) + gap_y, c * (width + gap_x)
            if captions and captions[r][c]:
                ax.text(x + width / 2, y - 1, captions[r][c], ha="center", va="bottom", fontsize=MIN_FONT_PT)
    for c, name in enumerate(column_titles):
        ax.text(c * (width + gap_x) + width / 2, top / 2, name, ha="center", va="center", fontsize=TITLE_PT,
                fontweight="bold")
    for r, name in enumerate(row_labels):
        ax.text(-gap_x, top + r * (height + gap_y) + gap_y + height / 2, name, ha="right", va="center",
                fontsize=MIN_FONT_PT)
    if title:
        figure.suptitle(title, fontsize=SUPTITLE_PT, y=1 - 0.06 / figure_height, va="top")
    return figure


def per_image_figure(images: np.ndarray, maps: Mapping[str, np.ndarray], captions: Sequence[str],
                     groups_per_row: int = 2) -> Figure:
    """Each image then one overlay per method, ``groups_per_row`` images side by side; captions say true/predicted."""
    methods = list(maps)
    tiles, texts = [], []
    for start in range(0, len(images), groups_per_row):
        row_tiles, row_texts = [], []
        for index in range(start, min(start + groups_per_row, len(images))):
            row_tiles += [images[index]] + [overlay(images[index], maps[m][index]) for m in methods]
            # "true X\npred Y (0.73)" on three lines, so that the longest class names fit the cell
            row_texts += [captions[index].replace("_", " ").replace(" (", "\n(")] + [""] * len(methods)
        tiles.append(row_tiles)
        texts.append(row_texts)
    titles = (["image", *methods] * groups_per_row)[: len(tiles[0])]
    return mosaic_figure(tiles, texts, titles, title="Explained test images: image, then each method's map")


def outcome_grid_figure(
    cells: Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray, str] | None],
    classes: Sequence[str],
    outcomes: Sequence[str],
    method: str,
    columns: int = OUTCOME_COLUMNS,
) -> Figure:
    """The most confident image of each class and outcome (TP/FP/FN) that has one, with its map.

    Only (class, outcome) pairs with an image are drawn, in class order then outcome order, ``columns`` to a
    row; each panel's caption names its class and outcome, then the prediction (``cells[...][2]``). A class
    with one error and no correct image gets one panel, not a row of placeholders.
    """
    panels = [(name, outcome, cells[(name, outcome)]) for name in classes for outcome in outcomes
              if cells.get((name, outcome)) is not None]
    if not panels:
        raise ValueError("no image to show in the outcome grid")
    columns = max(1, min(columns, len(panels)))
    tiles = [[overlay(cell[0], cell[1]) for _, _, cell in panels[start:start + columns]]
             for start in range(0, len(panels), columns)]
    texts = [[f"{name.replace('_', ' ')}: {outcome}\n{cell[2].replace('_', ' ')}"
              for name, outcome, cell in panels[start:start + columns]]
             for start in range(0, len(panels), columns)]
    return mosaic_figure(tiles, texts, title=f"{method}: most confident image per class and outcome")


def token_maps_figure(images: np.ndarray, maps: np.ndarray, title: str) -> Figure:
    """One row per image: the image, then the S TokenLearner maps (each on its own colour scale)."""
    count = maps.shape[1]
    tiles = [[images[row]] + [overlay(images[row], maps[row, token], "magma") for token in range(count)]
             for row in range(maps.shape[0])]
    return mosaic_figure(tiles, None, ["image"] + [f"token {t + 1}" for t in range(count)], title=title)


def kept_patches_figure(images: np.ndarray, importance: np.ndarray, kept: np.ndarray) -> Figure:
    """One row per image: image, the scorer's importance map, and the image with the pruned patches darkened."""
    tiles, texts = [], []
    for row, image in enumerate(images):
        scale = (image.shape[0] // kept.shape[1], image.shape[1] // kept.shape[2])
        mask = np.kron(kept[row].astype(float), np.ones(scale))[..., None]
        pad = ((0, image.shape[0] - mask.shape[0]), (0, image.shape[1] - mask.shape[1]), (0, 0))
        mask = np.pad(mask, pad, mode="edge")
        tiles.append([image, overlay(image, importance[row]), (image * (0.25 + 0.75 * mask)).astype(np.uint8)])
        texts.append(["", "", f"{int(kept[row].sum())} of {kept[row].size} kept"])
    return mosaic_figure(tiles, texts, ["image", "scorer importance", "patches the ViT read"],
                         title="CNN-pruned ViT: the scorer's map and the kept patches")


def merge_sources_figure(images: np.ndarray, holders: np.ndarray) -> Figure:
    """One row per image: the image and its patches coloured by the merged token that holds them."""
    tiles, texts = [], []
    for row, image in enumerate(images):
        labels = holders[row].astype(int)
        palette = (colormaps["tab20"](np.arange(20))[:, :3] * 255).astype(np.uint8)
        # Shuffle token ids so that neighbouring tokens get distinct colours.
        order = np.random.default_rng(0).permutation(max(int(labels.max()) + 1, 1))
        colours = palette[order[np.maximum(labels, 0)] % 20]
        blended = (image * 0.4 + colours * 0.6).astype(np.uint8)
        tiles.append([image, np.where((labels >= 0)[..., None], blended, image)])
        texts.append(["", f"{len(np.unique(labels[labels >= 0]))} tokens"])
    return mosaic_figure(tiles, texts, ["image", "merged tokens"], title="Which patches each merged token holds")


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
        ax.legend(fontsize=MIN_FONT_PT, markerscale=1.2, loc="best", frameon=False)
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
        ax.legend(fontsize=MIN_FONT_PT, frameon=False)
    return figure


def _colour(index: int) -> str:
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
               "#bcbd22", "#7f7f7f"]
    return palette[index % len(palette)]


def _natural_key(text: str) -> tuple:
    return (0, int(text), "") if text.isdigit() else (1, 0, text)
