"""Pictures of a slide at thumbnail scale: tissue contour and kept tiles; tumour-probability heatmaps."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

TISSUE_COLOUR = (0, 170, 0)
TILE_COLOURS = {"tumor": (220, 0, 0), "normal": (0, 90, 255), "": (90, 90, 90)}
ANNOTATION_COLOUR = (0, 0, 0)


def _contours(draw: ImageDraw.ImageDraw, mask: np.ndarray, colour: tuple[int, int, int], width: int = 1) -> None:
    from skimage.measure import find_contours

    padded = np.pad(mask.astype(np.uint8), 1)  # closes contours that touch the border
    for contour in find_contours(padded, 0.5):  # (K, 2) rows, cols
        points = [(float(c) - 1, float(r) - 1) for r, c in contour]
        if len(points) > 1:
            draw.line(points, fill=colour, width=width)


def _geometry_outlines(draw: ImageDraw.ImageDraw, geometry, scale: tuple[float, float], colour, width: int = 2) -> None:
    import shapely

    for polygon in shapely.get_parts(geometry):
        if polygon.is_empty or polygon.geom_type != "Polygon":
            continue
        for ring in [polygon.exterior, *polygon.interiors]:
            xy = np.asarray(ring.coords) / np.asarray(scale)
            draw.line([tuple(p) for p in xy], fill=colour, width=width)


def tiling_thumbnail(
    image: np.ndarray,
    mask: np.ndarray,
    scale: tuple[float, float],
    xs: Sequence[float],
    ys: Sequence[float],
    size: float,
    labels: Sequence[str],
) -> Image.Image:
    """The thumbnail with the tissue contour (green) and kept tiles (red tumour, blue normal, grey unknown)."""
    picture = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(picture)
    _contours(draw, mask, TISSUE_COLOUR, width=2)
    sx, sy = scale
    for x, y, label in zip(xs, ys, labels):
        box = (x / sx, y / sy, (x + size) / sx - 1, (y + size) / sy - 1)
        draw.rectangle(box, outline=TILE_COLOURS.get(label, TILE_COLOURS[""]))
    return picture


def heatmap(
    image: np.ndarray,
    scale: tuple[float, float],
    xs: Sequence[float],
    ys: Sequence[float],
    size: float,
    probabilities: Sequence[float],
    annotations=None,
    alpha: float = 0.5,
) -> Image.Image:
    """Tumour probability per tile (matplotlib's ``jet``) blended over the thumbnail; tumour outlines in black."""
    from matplotlib import colormaps

    h, w = image.shape[:2]
    value = np.zeros((h, w), dtype=np.float32)
    covered = np.zeros((h, w), dtype=bool)
    sx, sy = scale
    for x, y, p in zip(xs, ys, probabilities):
        x0, y0 = int(round(x / sx)), int(round(y / sy))
        x1, y1 = max(int(round((x + size) / sx)), x0 + 1), max(int(round((y + size) / sy)), y0 + 1)
        value[y0:y1, x0:x1] = np.maximum(value[y0:y1, x0:x1], p)  # overlapping tiles: the higher one shows
        covered[y0:y1, x0:x1] = True
    colours = (colormaps["jet"](value)[..., :3] * 255).astype(np.float32)  # (h, w, 3)
    blended = image.astype(np.float32)
    blended[covered] = (1 - alpha) * blended[covered] + alpha * colours[covered]
    picture = Image.fromarray(np.round(blended).astype(np.uint8))
    if annotations is not None:
        _geometry_outlines(ImageDraw.Draw(picture), annotations.region, scale, ANNOTATION_COLOUR)
    return picture


def png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
