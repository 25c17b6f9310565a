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


@dataclasses.dataclass(frozen=True)
class Shape:
    """A filled shape in level-0 pixels: ``rect``/``ellipse`` use the box (x0, y0, x1, y1);
    ``line`` is the segment (x0, y0)-(x1, y1) drawn ``width`` pixels thick."""

    kind: Literal["rect", "ellipse", "line"]
    box: tuple[float, float, float, float]
    color: tuple[int, int, int]
    width: float = 0.0
    noise: float = 8.0  # amplitude of the per-pixel texture (keeps Otsu honest; 0 gives flat colour)


def render(shapes: Sequence[Shape], x0: float, y0: float, width: int, height: int, downsample: float,
           seed: int = 0) -> np.ndarray:
    """RGB uint8 (height, width, 3) of the region whose top-left is level-0 (x0, y0), one pixel per
    ``downsample`` level-0 pixels; a pixel takes the colour of the last shape covering its centre."""
    xs = x0 + (np.arange(width) + 0.5) * downsample  # level-0 pixel centres, (W,)
    ys = y0 + (np.arange(height) + 0.5) * downsample  # (H,)
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    rng = np.random.default_rng([seed, int(x0), int(y0), int(downsample * 1000)])
    for shape in shapes:
        ax, ay, bx, by = shape.box
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
        colour = np.asarray(shape.color, dtype=np.int16)
        count = int(inside.sum())
        texture = rng.integers(-int(shape.noise), int(shape.noise) + 1, size=(count, 1)) if shape.noise else 0
        image[inside] = np.clip(colour + texture, 0, 255).astype(np.uint8)
    return image


def _tiles(shapes: Sequence[Shape], width: int, height: int, downsample: float, tile: int,
           seed: int) -> Iterator[np.ndarray]:
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            block = np.full((tile, tile, 3), 255, dtype=np.uint8)
            h, w = min(tile, height - top), min(tile, width - left)
            block[:h, :w] = render(shapes, left * downsample, top * downsample, w, h, downsample, seed)
            yield block


def write_slide(
    path: str | Path,
    shapes: Sequence[Shape],
    size: tuple[int, int],
    mpp: float = 0.25,
    levels: int | None = None,
    tile: int = 256,
    compression: str | None = "zlib",
    seed: int = 0,
    objective_power: float | None = None,
) -> Path:
    """Write a tiled pyramidal TIFF of level-0 ``size`` (width, height) at ``mpp`` microns per pixel.

    Levels halve the size until the smallest side is below 2 tiles (or ``levels`` of them). The file is
    BigTIFF when level 0 is over 1 GiB uncompressed.
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
                _tiles(shapes, w, h, downsample, tile, seed),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                resolution=(pixels_per_cm / downsample, pixels_per_cm / downsample),
                resolutionunit="CENTIMETER",
                subfiletype=1 if level else 0,
                description=description if level == 0 else None,
                metadata=None,
            )
    return path
