"""Open a whole-slide image with OpenSlide and read regions at a physical resolution.

Resolution is always a value with units (:class:`Resolution`: microns per pixel or objective power),
never a bare number or string, as in TIAToolbox's ``WSIReader``. ``open_slide`` is the one factory:
it opens any format OpenSlide reads (.svs, .tif/.tiff, .ndpi, .mrxs, ...) and finds the level-0 pixel
size from ``openslide.mpp-x/y``, from the TIFF resolution tags, or from the caller's ``mpp`` when the
file has none; every failure is one line naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif")
# Objective power assumed when a slide does not record one: 10 / mpp (0.25 mpp = 40x, 0.5 mpp = 20x),
# the convention of Aperio and Hamamatsu scanners.
MICRONS_AT_1X = 10.0
# Level-0 pixels a slide may declare per byte of its file(s). Scanner files hold tens of pixels per byte (JPEG
# tiles of blank glass about 80, deflated white about 330); a file declaring thousands per byte is damaged or
# hostile, and reading it would take hours and gigabytes, so it is refused when opened.
MAX_PIXELS_PER_BYTE = 2000
# Formats whose pixels live in other files beside the named one (their size is not checked).
MULTI_FILE_SUFFIXES = (".mrxs", ".vms", ".vmu")


@dataclasses.dataclass(frozen=True)
class Resolution:
    """A resolution with its units: ``Resolution(0.5, "mpp")`` or ``Resolution(20, "power")``."""

    value: float
    units: Literal["mpp", "power"]

    def __post_init__(self) -> None:
        if self.units not in ("mpp", "power"):
            raise ValueError(f"resolution units must be 'mpp' or 'power', not {self.units!r}")
        if not self.value > 0:
            raise ValueError(f"resolution must be positive, not {self.value} {self.units}")

    def __str__(self) -> str:
        return f"{self.value:g} mpp" if self.units == "mpp" else f"{self.value:g}x"


class Slide:
    """An open slide: OpenSlide handle, level-0 microns per pixel and objective power.

    Use :func:`open_slide` to make one. ``close()`` (or a ``with`` block) releases the handle.
    """

    def __init__(self, handle, path: Path, mpp: float, objective_power: float | None) -> None:
        self.handle = handle
        self.path = path
        self.mpp = mpp
        self.objective_power = objective_power

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.handle.close()

    @property
    def name(self) -> str:
        return slide_name(self.path)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self.handle.dimensions

    @property
    def level_count(self) -> int:
        return self.handle.level_count

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self.handle.level_downsamples

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.handle.level_dimensions

    def mpp_of(self, resolution: Resolution) -> float:
        """Microns per pixel that ``resolution`` stands for on this slide."""
        if resolution.units == "mpp":
            return resolution.value
        power = self.objective_power or MICRONS_AT_1X / self.mpp
        return self.mpp * power / resolution.value

    def downsample_for(self, resolution: Resolution) -> float:
        """Level-0 pixels per pixel at ``resolution`` (2.0 for 0.5 mpp on a 0.25 mpp slide)."""
        return self.mpp_of(resolution) / self.mpp

    def best_level(self, downsample: float) -> int:
        """The pyramid level to read for ``downsample``: the coarsest one not coarser than asked.

        A relative tolerance of 1e-3 keeps a level whose recorded downsample is a rounding error
        above the request (1024 x 768 from 2047 x 1535 gives 1.999, not 2).
        """
        return int(self.handle.get_best_level_for_downsample(downsample * (1 + 1e-3)))

    def read_image(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """A region as a PIL RGB image: OpenSlide's RGBA (not premultiplied) composited over white."""
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} does not exist (the slide has {self.level_count} levels)")
        region = self.handle.read_region(location, level, size)  # PIL RGBA
        if region.getchannel("A").getextrema()[0] < 255:  # transparent pixels (outside the scanned area) become white
            region = Image.alpha_composite(Image.new("RGBA", region.size, (255, 255, 255, 255)), region)
        return region.convert("RGB")

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) of ``size`` pixels at ``level``, top-left at level-0 ``location``.

        Transparent pixels (outside the scanned area) become white, as slide background is.
        """
        return np.asarray(self.read_image(location, level, size))

    def read_tile(self, x: int, y: int, level: int, read_size: int, tile_size: int) -> np.ndarray:
        """RGB uint8 (tile_size, tile_size, 3): a ``read_size`` square at ``level`` resized to ``tile_size``."""
        region = self.read_image((x, y), level, (read_size, read_size))
        if read_size != tile_size:
            region = region.resize((tile_size, tile_size), Image.Resampling.BILINEAR)
        return np.asarray(region)

    def read_level(self, level: int) -> np.ndarray:
        """A whole pyramid level as RGB uint8 (h, w, 3) (used for the low-resolution thumbnail)."""
        return self.read_region((0, 0), level, self.level_dimensions[level])


def slide_name(path: str | Path) -> str:
    """A slide's name in tile folders: its file name without the suffix (``tumor_001.tif`` -> ``tumor_001``)."""
    return Path(path).name.rsplit(".", 1)[0] if "." in Path(path).name else Path(path).name


def is_slide_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SLIDE_SUFFIXES


def _float_property(properties, key: str) -> float | None:
    try:
        value = float(properties[key])
    except (KeyError, ValueError, TypeError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def mpp_from_properties(properties) -> float | None:
    """Level-0 microns per pixel from ``openslide.mpp-x/y`` or, failing that, the TIFF resolution tags."""
    mpp_x, mpp_y = _float_property(properties, "openslide.mpp-x"), _float_property(properties, "openslide.mpp-y")
    if mpp_x and mpp_y:
        return (mpp_x + mpp_y) / 2
    if mpp_x or mpp_y:
        return mpp_x or mpp_y
    resolution = _float_property(properties, "tiff.XResolution")
    unit = str(properties.get("tiff.ResolutionUnit", "")).lower()
    microns = {"centimeter": 1e4, "centimetre": 1e4, "inch": 25400.0}.get(unit)
    if resolution and microns:
        return microns / resolution
    return None


def check_declared_size(path: Path, dimensions: tuple[int, int], handle=None) -> None:
    """Refuse a single-file slide whose declared level-0 size is implausible for its bytes (see
    ``MAX_PIXELS_PER_BYTE``): one line naming the file, before any pixel is read."""
    if path.suffix.lower() in MULTI_FILE_SUFFIXES:
        return
    width, height = dimensions
    size = path.stat().st_size
    if float(width) * float(height) > MAX_PIXELS_PER_BYTE * max(size, 1):
        if handle is not None:
            handle.close()
        raise ValueError(f"{path}: declares {width} x {height} pixels in a file of {size:,} bytes, more than any "
                         f"real slide compresses ({MAX_PIXELS_PER_BYTE} pixels per byte); the file is damaged or "
                         "not a slide, so it was refused")


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open ``path`` with OpenSlide; ``mpp`` is used when the file records no pixel size (and overrides none).

    Raises FileNotFoundError / ValueError with one line naming the file and the fix.
    """
    import openslide

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such slide file")
    try:
        handle = openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"{path}: OpenSlide cannot read this file ({detail}); is it a whole-slide image (.svs, .tif, .ndpi, .mrxs)?"
        ) from None
    check_declared_size(path, handle.dimensions, handle)
    found = mpp_from_properties(handle.properties)
    if found is None and mpp is None:
        handle.close()
        raise ValueError(f"{path}: the slide records no pixel size (mpp); give its microns per pixel with --slide-mpp")
    power = _float_property(handle.properties, "openslide.objective-power")
    return Slide(handle, path, found if found is not None else float(mpp), power)
