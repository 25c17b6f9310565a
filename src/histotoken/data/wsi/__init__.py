"""Whole-slide images: OpenSlide reader, tissue mask, tile grid, annotations, tile dataset, slide prediction.

One job per module: :mod:`reader` (open a slide, its mpp and pyramid levels), :mod:`tissue` (low-resolution
tissue mask), :mod:`tiling` (tile grid, per-slide tile tables, the ``histotoken tile`` worker),
:mod:`annotations` (ASAP XML / QuPath GeoJSON polygons, tile tumour fractions), :mod:`labels` (slide labels
and patient ids), :mod:`dataset` (lazy tile reads), :mod:`synthetic` (generated pyramidal TIFF slides).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # ``histotoken.data.wsi.read_tile`` / ``TileDataset`` without importing torch for the reader and tiling.
    if name in ("read_tile", "TileDataset"):
        from histotoken.data.wsi import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
