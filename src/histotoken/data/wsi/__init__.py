"""Whole-slide images: OpenSlide reader, tissue mask, tile grid, annotations, tile dataset, slide prediction.

One job per module: :mod:`reader` (open a slide, its mpp and pyramid levels), :mod:`tissue` (low-resolution
tissue mask), :mod:`tiling` (tile grid, per-slide tile tables, the ``histotoken tile`` worker),
:mod:`annotations` (ASAP XML / QuPath GeoJSON polygons, tile tumour fractions), :mod:`labels` (slide labels
and patient ids), :mod:`dataset` (lazy tile reads), :mod:`synthetic` (generated pyramidal TIFF slides).
"""
