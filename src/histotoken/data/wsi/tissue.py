"""Tissue mask of a slide at a fixed physical resolution: stain against the slide's own glass, pen ink removed.

The mask is computed on an RGB image at ``TissueSettings.mask_mpp`` (8 microns per pixel by default),
whatever the pyramid holds: the level closest to that resolution is read in bounded blocks and box-averaged
down to it (:func:`read_at_mpp`), so a slide without a coarse level never sits in memory at full size and a
nucleus (5-10 um) is smaller than a mask pixel.

Tissue against glass (:func:`tissue_mask`):

1. The glass colour is the brightest mode of the grey-level histogram (:func:`estimate_background`): every
   slide is compared with its own background, so a dim scan or a tinted glass does not shift the result.
2. A pixel is tissue where its optical density against that glass, ``log10(glass / pixel)`` per channel
   (Beer-Lambert: stain absorbs light), has a norm above ``min_optical_density`` or above a few times the
   glass's own noise, or where its HSV saturation is clearly above the glass's. Optical density finds pale
   tissue that is barely coloured (stroma, a light haematoxylin counterstain); saturation finds faint but
   coloured eosin. Otsu's threshold on saturation, used before, split strong stain from weak stain instead.
3. Pen ink (:func:`pen_mask`) is a large connected region of ink colour: blue or green (hue 75-240 degrees,
   which holds no H&E stain colour, saturated) or black (value below 0.25); single dark or blue pixels (nuclei,
   a haematoxylin counterstain) are never ink, as they never make a region of ``min_ink_mm2``.
4. Clean-up with scikit-image: closing (joins nearby fragments), ``remove_small_holes``,
   ``remove_small_objects`` (sizes in microns and square millimetres, so they hold at any mask resolution);
   ink is cut out again at the end.

:func:`li_density_mask` is a second, independent method (Li's threshold on the same optical density) that the
tests and the benchmark compare the mask with (:func:`agreement`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np

from histotoken.data.wsi.reader import Slide

logger = logging.getLogger(__name__)

PEN_HUE_RANGE = (75.0, 240.0)  # degrees: green through blue
PEN_MIN_SATURATION = 0.25
PEN_MAX_VALUE = 0.25  # black ink: darker than this (0-1); dense nuclei at 8 um are far brighter
PEN_DILATION_UM = 16.0
MIN_BACKGROUND_GREY = 170  # a brightest mode darker than this is no glass (the slide is all tissue)
DEFAULT_BACKGROUND = (240, 240, 240)  # glass colour assumed when the slide shows no glass
MIN_GLASS_SHARE = 0.03  # a glass mode holds at least this share of the image's pixels
MAX_GLASS_SATURATION = 0.1  # glass is nearly neutral (white balance may tint it a little)
MAX_MASK_PIXELS = 32_000_000  # the mask resolution is coarsened beyond this (a 75 x 25 mm slide at 8 um: 29 Mpx)
READ_BLOCK = 2048  # pixels per side of one region read while building the mask image (16 MiB of RGBA)
PROGRESS_SECONDS = 5.0  # log progress of a mask read at most this often


@dataclasses.dataclass(frozen=True)
class TissueSettings:
    """Tissue detection settings; sizes are physical so they hold at any mask resolution."""

    mask_mpp: float = 8.0  # microns per pixel of the mask, whatever levels the slide has
    closing_um: float = 16.0  # radius of the closing that joins nearby tissue fragments
    min_object_mm2: float = 0.005  # smaller tissue specks are dropped
    min_hole_mm2: float = 0.005  # smaller holes in tissue are filled
    min_optical_density: float = 0.05  # norm of log10(glass / pixel) over RGB above which a pixel is tissue
    min_saturation: float = 0.07  # HSV saturation above the glass's by this much is tissue
    min_ink_mm2: float = 0.02  # a pen mark is a connected region of ink colour at least this large


@dataclasses.dataclass
class TissueMask:
    """A boolean tissue mask over the whole slide with its scale, and the RGB image it came from."""

    mask: np.ndarray  # (h, w) bool
    image: np.ndarray  # (h, w, 3) uint8: the slide at the mask resolution (also the thumbnail)
    scale: tuple[float, float]  # level-0 pixels per mask pixel along x and y
    level: int  # the pyramid level the image was read from
    threshold: float  # the optical-density threshold used
    background: tuple[int, int, int] = DEFAULT_BACKGROUND  # the glass colour found
    ink: np.ndarray | None = None  # (h, w) bool: pen marks found

    @property
    def tissue_fraction(self) -> float:
        """Share of the slide's area that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def fractions(self, xs: np.ndarray, ys: np.ndarray, size: float) -> np.ndarray:
        """Tissue fraction of each level-0 square (x, y, size): the share of its mask pixels that are tissue.

        Box sums come from an integral image, so this costs O(mask + tiles) for any number of tiles.
        """
        sx, sy = self.scale
        h, w = self.mask.shape
        integral = np.zeros((h + 1, w + 1), dtype=np.int64)
        integral[1:, 1:] = self.mask.astype(np.int64).cumsum(0).cumsum(1)
        x0 = np.clip(np.round(np.asarray(xs) / sx).astype(np.int64), 0, w)
        y0 = np.clip(np.round(np.asarray(ys) / sy).astype(np.int64), 0, h)
        x1 = np.clip(np.maximum(np.round((np.asarray(xs) + size) / sx).astype(np.int64), x0 + 1), 0, w)
        y1 = np.clip(np.maximum(np.round((np.asarray(ys) + size) / sy).astype(np.int64), y0 + 1), 0, h)
        inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        area = np.maximum((x1 - x0) * (y1 - y0), 1)
        return inside / area


def estimate_background(rgb: np.ndarray) -> tuple[int, int, int]:
    """The glass colour of an RGB uint8 image (h, w, 3): the median colour of its brightest glass-like mode.

    A mode is a local maximum of the (5-level smoothed) grey histogram; it is glass-like when it is at least
    ``MIN_BACKGROUND_GREY`` bright, holds at least ``MIN_GLASS_SHARE`` of the pixels within 3 grey levels and
    is nearly neutral (median saturation below ``MAX_GLASS_SATURATION``). Pure white (every channel >= 254) is
    left out while another glass mode exists: scanners fill areas outside the scanned region with it, next to
    the real, greyer glass. Without any glass-like mode the image shows no glass and ``DEFAULT_BACKGROUND``
    is returned.
    """
    pure_white = rgb.min(axis=-1) >= 254  # (h, w)
    levels = np.clip(np.round(rgb.astype(np.float32).mean(axis=-1)), 0, 255).astype(np.int64)  # (h, w) grey
    saturation = _saturation(rgb)
    for candidates in (~pure_white, np.ones_like(pure_white)):
        histogram = np.bincount(levels[candidates], minlength=256).astype(np.float64)  # (256,)
        smooth = np.convolve(histogram, np.ones(5) / 5, mode="same")
        padded = np.pad(smooth, 1, constant_values=-1.0)
        peaks = np.flatnonzero((smooth >= padded[:-2]) & (smooth >= padded[2:]) & (smooth > 0))
        for peak in sorted(peaks[peaks >= MIN_BACKGROUND_GREY], reverse=True):
            if histogram[max(peak - 3, 0): peak + 4].sum() < MIN_GLASS_SHARE * levels.size:
                continue  # too few pixels for glass (checked on the histogram, before any per-pixel work)
            glass = candidates & (np.abs(levels - peak) <= 3)  # (h, w) pixels of this mode
            if np.median(saturation[glass]) < MAX_GLASS_SATURATION:
                return tuple(int(v) for v in np.median(rgb[glass], axis=0))  # type: ignore[return-value]
    return DEFAULT_BACKGROUND


def optical_density(rgb: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Norm over RGB of ``log10((glass + 1) / (pixel + 1))`` (h, w); pixels brighter than glass count 0."""
    glass = np.asarray(background, dtype=np.float32) + 1.0
    density = np.log10(glass / (rgb.astype(np.float32) + 1.0))  # (h, w, 3)
    return np.sqrt((np.clip(density, 0.0, None) ** 2).sum(axis=-1))


def _saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (max - min) / max in [0, 1], (h, w)."""
    high = rgb.max(axis=-1).astype(np.float32)
    low = rgb.min(axis=-1).astype(np.float32)
    return np.where(high > 0, (high - low) / np.maximum(high, 1.0), 0.0)


def pen_mask(rgb: np.ndarray, mpp: float | None = None, min_ink_mm2: float = TissueSettings.min_ink_mm2) -> np.ndarray:
    """Pen ink in an RGB uint8 image (h, w, 3) at ``mpp`` microns per pixel -> (h, w) bool.

    Ink colour is blue or green (hue in ``PEN_HUE_RANGE``, saturation above ``PEN_MIN_SATURATION``) or black
    (value below ``PEN_MAX_VALUE``); only connected regions
    of ink colour of at least ``min_ink_mm2`` are ink (without ``mpp``, every ink-coloured pixel is).
    """
    from skimage.color import rgb2hsv
    from skimage.morphology import remove_small_objects

    hsv = rgb2hsv(rgb)  # (h, w, 3), each channel in [0, 1]
    hue_degrees = hsv[..., 0] * 360.0
    coloured = (hue_degrees >= PEN_HUE_RANGE[0]) & (hue_degrees < PEN_HUE_RANGE[1]) & (hsv[..., 1] > PEN_MIN_SATURATION)
    black = hsv[..., 2] < PEN_MAX_VALUE
    if mpp is None:
        return coloured | black
    smaller = int(min_ink_mm2 / (mpp / 1000.0) ** 2)
    # scikit-image >= 0.26: max_size removes objects of at most that many pixels.
    ink = [remove_small_objects(part, max_size=smaller) if part.any() else part for part in (coloured, black)]
    return ink[0] | ink[1]


def _clean(mask: np.ndarray, mpp: float, settings: TissueSettings) -> np.ndarray:
    from skimage.morphology import closing, disk, remove_small_holes, remove_small_objects

    pixel_mm2 = (mpp / 1000.0) ** 2
    radius = int(round(settings.closing_um / mpp))
    if radius > 0:
        mask = closing(mask, disk(radius))
    mask = remove_small_holes(mask, max_size=int(settings.min_hole_mm2 / pixel_mm2))
    return remove_small_objects(mask, max_size=int(settings.min_object_mm2 / pixel_mm2))


def _dilated_ink(rgb: np.ndarray, mpp: float, settings: TissueSettings) -> np.ndarray:
    from skimage.morphology import dilation, disk

    ink = pen_mask(rgb, mpp, settings.min_ink_mm2)
    if ink.any():  # the pale anti-aliased rim of a stroke goes with it
        ink = dilation(ink, disk(max(int(round(PEN_DILATION_UM / mpp)), 1)))
    return ink


def tissue_mask(
    rgb: np.ndarray,
    mpp: float,
    settings: TissueSettings = TissueSettings(),
    background: tuple[int, int, int] | None = None,
) -> tuple[np.ndarray, float]:
    """(tissue mask (h, w) bool, optical-density threshold) of an RGB uint8 image at ``mpp`` microns per pixel.

    ``background`` is the glass colour (found with :func:`estimate_background` when not given).
    """
    background = estimate_background(rgb) if background is None else background
    density = optical_density(rgb, background)  # (h, w)
    saturation = _saturation(rgb)
    glass = np.all(np.abs(rgb.astype(np.int16) - np.asarray(background, dtype=np.int16)) <= 6, axis=-1)
    # The glass's own spread: tissue must stand out from it (noisy scans get a higher threshold).
    density_noise = float(np.percentile(density[glass], 99)) if glass.sum() > 100 else 0.0
    saturation_glass = float(np.percentile(saturation[glass], 99)) if glass.sum() > 100 else 0.0
    threshold = max(settings.min_optical_density, 2.0 * density_noise)
    ink = _dilated_ink(rgb, mpp, settings)
    stained = (density > threshold) | (saturation > saturation_glass + settings.min_saturation)
    mask = _clean(stained & ~ink, mpp, settings)
    return mask & ~ink, threshold


def li_density_mask(rgb: np.ndarray, mpp: float, settings: TissueSettings = TissueSettings()) -> np.ndarray:
    """A second method to check :func:`tissue_mask` against: Li's minimum cross-entropy threshold
    (scikit-image ``threshold_li``) on the optical density against the glass, without the saturation rule or
    the noise model, then the same ink removal and clean-up. (Otsu's threshold there splits strong stain
    from weak stain on an IHC slide, as it did on saturation.)"""
    from skimage.filters import threshold_li

    density = optical_density(rgb, estimate_background(rgb))
    ink = _dilated_ink(rgb, mpp, settings)
    values = density[~ink]
    if not values.size or values.max() <= values.min():
        return np.zeros(density.shape, dtype=bool)
    threshold = max(float(threshold_li(values)), settings.min_optical_density)
    return _clean((density > threshold) & ~ink, mpp, settings) & ~ink


def agreement(first: np.ndarray, second: np.ndarray) -> dict[str, float]:
    """Intersection over union and Dice coefficient of two boolean masks (1.0 when both are empty)."""
    both = float(np.logical_and(first, second).sum())
    either = float(np.logical_or(first, second).sum())
    total = float(first.sum() + second.sum())
    return {"iou": both / either if either else 1.0, "dice": 2 * both / total if total else 1.0}


def mask_resolution(slide: Slide, mask_mpp: float) -> tuple[int, int]:
    """(pyramid level to read, integer shrink factor) for an image at about ``mask_mpp`` microns per pixel.

    The resolution is coarsened when the whole slide at ``mask_mpp`` would exceed ``MAX_MASK_PIXELS``, so the
    image is bounded whatever size the file declares.
    """
    width, height = slide.dimensions
    level0_pixels = float(width) * float(height)
    mask_mpp = max(mask_mpp, slide.mpp * math.sqrt(level0_pixels / MAX_MASK_PIXELS))
    target = mask_mpp / slide.mpp  # level-0 pixels per mask pixel
    level = slide.best_level(target)
    factor = max(int(round(target / slide.level_downsamples[level])), 1)
    return level, factor


def read_at_mpp(slide: Slide, mask_mpp: float) -> tuple[np.ndarray, int, tuple[float, float]]:
    """(RGB uint8 (h, w, 3) of the whole slide at about ``mask_mpp``, level read, level-0 pixels per pixel).

    The level closest to ``mask_mpp`` is read in blocks of at most ``READ_BLOCK`` x ``READ_BLOCK`` pixels,
    each box-averaged by the shrink factor as it arrives, so memory stays bounded (one block plus the result)
    for any slide. Progress is logged at INFO every ``PROGRESS_SECONDS`` for slides that take long.
    """
    level, factor = mask_resolution(slide, mask_mpp)
    width, height = slide.level_dimensions[level]
    block = max(READ_BLOCK // factor, 1) * factor  # a multiple of the factor: blocks shrink without seams
    out_width, out_height = math.ceil(width / factor), math.ceil(height / factor)
    image = np.empty((out_height, out_width, 3), dtype=np.uint8)
    x_step = slide.dimensions[0] / width  # level-0 pixels per level pixel
    y_step = slide.dimensions[1] / height
    start = last_report = time.perf_counter()
    rows = range(0, height, block)
    for row_index, top in enumerate(rows):
        for left in range(0, width, block):
            size = (min(block, width - left), min(block, height - top))
            region = slide.read_image((int(round(left * x_step)), int(round(top * y_step))), level, size)
            if factor > 1:
                region = region.reduce(factor)  # box average; a partial edge block averages what it has
            y0, x0 = top // factor, left // factor
            image[y0: y0 + region.height, x0: x0 + region.width] = np.asarray(region)
        now = time.perf_counter()
        if now - last_report >= PROGRESS_SECONDS:
            logger.info("%s: reading the tissue-mask image, %d%% after %.0f s", slide.path,
                        100 * (row_index + 1) // len(rows), now - start)
            last_report = now
    scale = (slide.dimensions[0] / out_width, slide.dimensions[1] / out_height)
    return image, level, scale


def detect_tissue(slide: Slide, settings: TissueSettings = TissueSettings()) -> TissueMask:
    """The tissue mask of ``slide`` at about ``settings.mask_mpp`` microns per pixel (see the module docstring)."""
    start = time.perf_counter()
    image, level, scale = read_at_mpp(slide, settings.mask_mpp)
    mpp = slide.mpp * (scale[0] + scale[1]) / 2
    background = estimate_background(image)
    mask, threshold = tissue_mask(image, mpp, settings, background)
    ink = pen_mask(image, mpp, settings.min_ink_mm2)
    seconds = time.perf_counter() - start
    log = logger.info if seconds > PROGRESS_SECONDS else logger.debug
    log("%s: tissue mask at %.1f um/px from level %d (%dx%d px), glass %s, density threshold %.3f: %.1f%% tissue"
        " (%.1f s)", slide.path, mpp, level, image.shape[1], image.shape[0], background, threshold,
        100 * mask.mean(), seconds)
    return TissueMask(mask=mask, image=image, scale=scale, level=level, threshold=threshold,
                      background=background, ink=ink)
