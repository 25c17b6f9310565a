"""Generated pyramidal TIFF slides (tests and benchmarks): shapes drawn on white, written with tifffile.

A slide is a list of :class:`Shape` (axis-aligned rectangles, ellipses or thick line segments in level-0
pixels, each with an RGB colour) on a white background. Every pyramid level is rendered from the shapes
at its own scale, tile by tile, so a 40,000 px slide never sits in memory. Reduced levels are written as
``subfiletype=1`` pages (the layout OpenSlide's generic-TIFF reader recognises as a pyramid), and the
resolution tags carry the pixel size so that OpenSlide reports ``openslide.mpp-x/y``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

# Texture: a fixed random pattern in [-1, 1], tiled over every level (cheap to look up for a 40,000 px slide).
_PATTERN = np.random.default_rng(1234).uniform(-1.0, 1.0, size=(257, 263)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Shape:
    """A filled shape in level-0 pixels: ``rect``/``ellipse`` use the box (x0, y0, x1, y1);
    ``line`` is the segment (x0, y0)-(x1, y1) drawn ``width`` pixels thick."""

    kind: Literal["rect", "ellipse", "line"]
    box: tuple[float, float, float, float]
    color: tuple[int, int, int]
    width: float = 0.0
    noise: float = 8.0  # amplitude of the per-pixel texture (keeps Otsu honest; 0 gives flat colour)


def render(shapes: Sequence[Shape], x0: float, y0: float, width: int, height: int, downsample: float) -> np.ndarray:
    """RGB uint8 (height, width, 3) of the region whose top-left is level-0 (x0, y0), one pixel per
    ``downsample`` level-0 pixels; a pixel takes the colour of the last shape covering its centre."""
    xs = x0 + (np.arange(width) + 0.5) * downsample  # level-0 pixel centres, (W,)
    ys = y0 + (np.arange(height) + 0.5) * downsample  # (H,)
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    texture = None  # (H, W) in [-1, 1]: a fixed pattern tiled over the level's pixels, made when first needed
    x_end, y_end = x0 + width * downsample, y0 + height * downsample
    for shape in shapes:
        ax, ay, bx, by = shape.box
        margin = shape.width / 2
        if (max(ax, bx) + margin < x0 or min(ax, bx) - margin > x_end
                or max(ay, by) + margin < y0 or min(ay, by) - margin > y_end):
            continue  # the shape's bounding box misses the region (most tiles of a large slide)
        if shape.kind == "rect":
            inside = ((ys >= ay) & (ys < by))[:, None] & ((xs >= ax) & (xs < bx))[None, :]
        elif shape.kind == "ellipse":
            cx, cy, rx, ry = (ax + bx) / 2, (ay + by) / 2, (bx - ax) / 2, (by - ay) / 2
            inside = ((xs[None, :] - cx) / rx) ** 2 + ((ys[:, None] - cy) / ry) ** 2 <= 1.0
        else:
            dx, dy = bx - ax, by - ay
            t = ((xs[None, :] - ax) * dx + (ys[:, None] - ay) * dy) / max(dx * dx + dy * dy, 1e-9)
            t = np.clip(t, 0.0, 1.0)
            distance = np.hypot(xs[None, :] - (ax + t * dx), ys[:, None] - (ay + t * dy))
            inside = distance <= shape.width / 2
        if not inside.any():
            continue
        colour = np.asarray(shape.color, dtype=np.float32)
        if shape.noise:
            if texture is None:
                rows = (np.arange(height) + int(round(y0 / downsample))) % _PATTERN.shape[0]
                columns = (np.arange(width) + int(round(x0 / downsample))) % _PATTERN.shape[1]
                texture = _PATTERN[np.ix_(rows, columns)]
            pixels = colour[None, :] + shape.noise * texture[inside][:, None]  # (count, 3), same shift per channel
        else:
            pixels = np.broadcast_to(colour, (int(inside.sum()), 3))
        image[inside] = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    return image


def _tiles(shapes: Sequence[Shape], width: int, height: int, downsample: float, tile: int) -> Iterator[np.ndarray]:
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            block = np.full((tile, tile, 3), 255, dtype=np.uint8)
            h, w = min(tile, height - top), min(tile, width - left)
            block[:h, :w] = render(shapes, left * downsample, top * downsample, w, h, downsample)
            yield block


def _compression_args(compression: str | None, level: int | None) -> dict | None:
    if compression == "zlib":
        return {"level": 1 if level is None else level}
    if compression == "jpeg":
        return {"level": 90 if level is None else level}
    return None


def write_slide(
    path: str | Path,
    shapes: Sequence[Shape],
    size: tuple[int, int],
    mpp: float = 0.25,
    levels: int | None = None,
    tile: int = 256,
    compression: str | None = "zlib",
    compression_level: int | None = None,
    objective_power: float | None = None,
) -> Path:
    """Write a tiled pyramidal TIFF of level-0 ``size`` (width, height) at ``mpp`` microns per pixel.

    Levels halve the size until the smallest side is below 2 tiles (or ``levels`` of them). The file is
    BigTIFF when level 0 is over 1 GiB uncompressed. ``compression``: ``zlib`` (deflate, level 1 by default:
    fast to write) or ``jpeg`` (quality 90 by default, like scanner files; tifffile needs the imagecodecs package
    to encode it), or None.
    """
    import tifffile

    path = Path(path)
    width, height = size
    if levels is None:
        levels = 1
        while min(width, height) / 2**levels >= 2 * tile and levels < 10:
            levels += 1
    pixels_per_cm = 1e4 / mpp
    bigtiff = width * height * 3 > 2**30
    description = f"histotoken synthetic slide; mpp={mpp}" + (f"; power={objective_power}" if objective_power else "")
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as writer:
        for level in range(levels):
            downsample = 2**level
            w, h = max(1, width // downsample), max(1, height // downsample)
            writer.write(
                _tiles(shapes, w, h, downsample, tile),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                compressionargs=_compression_args(compression, compression_level),
                resolution=(pixels_per_cm / downsample, pixels_per_cm / downsample),
                resolutionunit="CENTIMETER",
                subfiletype=1 if level else 0,
                description=description if level == 0 else None,
                metadata=None,
            )
    return path


def write_image_slide(
    path: str | Path, rgb: np.ndarray, mpp: float, levels: int = 1, tile: int = 128, compression: str | None = "zlib"
) -> Path:
    """Write an RGB uint8 image (h, w, 3) as a tiled TIFF slide at ``mpp`` microns per pixel, with ``levels``
    pyramid levels (each half the one before, box-averaged by PIL), e.g. a real photograph laid into a slide."""
    import tifffile
    from PIL import Image

    path = Path(path)
    pixels_per_cm = 1e4 / mpp
    picture = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    with tifffile.TiffWriter(path) as writer:
        for level in range(levels):
            if level:
                picture = picture.reduce(2)
            writer.write(
                np.asarray(picture), tile=(tile, tile), photometric="rgb", compression=compression,
                compressionargs=_compression_args(compression, None),
                resolution=(pixels_per_cm / 2**level, pixels_per_cm / 2**level), resolutionunit="CENTIMETER",
                subfiletype=1 if level else 0, metadata=None,
                description=f"histotoken image slide; mpp={mpp}" if level == 0 else None,
            )
    return path
