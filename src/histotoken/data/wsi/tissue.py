"""Tissue mask of a slide at low resolution: Otsu on saturation, pen marks removed, morphological clean-up.

Background glass is white or grey (low saturation) and H&E tissue is pink to purple (saturated), so
Otsu's threshold on the HSV saturation channel separates them (the approach of CLAM's
``create_patches_fp`` and most WSI toolkits). Pen marks are saturated too, so they are found first by
colour and left out both of the pixels Otsu sees and of the final mask:

- blue and green ink: hue between ``PEN_HUE_RANGE`` (75-240 degrees) with saturation above
  ``PEN_MIN_SATURATION``; eosin and haematoxylin stay in the red-magenta-violet range (about 240-360
  and 0-30 degrees), so this band holds no stain colour;
- black ink (and dark debris): value (brightness) below ``PEN_MAX_VALUE``.

The pen mask is dilated a little to take the pale anti-aliased rims of strokes with it. The clean-up then
closes small gaps, fills small holes and drops small specks (sizes in microns and square millimetres, so
they mean the same at every mask resolution), and pen pixels are removed again at the end (closing and
hole filling would otherwise paint a stroke that crosses tissue back in).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from histotoken.data.wsi.reader import Slide

logger = logging.getLogger(__name__)

PEN_HUE_RANGE = (75.0, 240.0)  # degrees: green through blue
PEN_MIN_SATURATION = 0.25
PEN_MAX_VALUE = 0.2  # black ink: darker than this (0-1)
PEN_DILATION_UM = 16.0
MIN_TISSUE_SATURATION = 0.05  # Otsu's threshold never goes below this (a blank slide stays blank)
MAX_MASK_PIXELS = 64_000_000  # a mask level larger than this is shrunk while read (see detect_tissue)


@dataclasses.dataclass(frozen=True)
class TissueSettings:
    """Tissue detection settings; sizes are physical so they hold at any mask resolution."""

    mask_mpp: float = 8.0  # microns per pixel of the mask (read from the pyramid level closest to it)
    closing_um: float = 16.0  # radius of the closing that joins nearby tissue fragments
    min_object_mm2: float = 0.005  # smaller tissue specks are dropped
    min_hole_mm2: float = 0.005  # smaller holes in tissue are filled
    min_saturation: float = MIN_TISSUE_SATURATION


@dataclasses.dataclass
class TissueMask:
    """A boolean tissue mask over the whole slide with its scale, and the RGB image it came from."""

    mask: np.ndarray  # (h, w) bool
    image: np.ndarray  # (h, w, 3) uint8: the pyramid level the mask was computed on (the thumbnail)
    scale: tuple[float, float]  # level-0 pixels per mask pixel along x and y
    level: int
    threshold: float  # the saturation threshold used (Otsu's, or the floor)

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


def pen_mask(rgb: np.ndarray, hsv: np.ndarray | None = None) -> np.ndarray:
    """Pixels of blue, green or black pen ink in an RGB uint8 image (h, w, 3) -> (h, w) bool.

    ``hsv`` is the image in HSV (scikit-image's ``rgb2hsv``) when the caller has it already.
    """
    from skimage.color import rgb2hsv

    hsv = rgb2hsv(rgb) if hsv is None else hsv  # (h, w, 3), each channel in [0, 1]
    hue_degrees = hsv[..., 0] * 360.0
    coloured_ink = (hue_degrees >= PEN_HUE_RANGE[0]) & (hue_degrees < PEN_HUE_RANGE[1])
    coloured_ink &= hsv[..., 1] > PEN_MIN_SATURATION
    black_ink = hsv[..., 2] < PEN_MAX_VALUE
    return coloured_ink | black_ink


def tissue_mask(rgb: np.ndarray, mpp: float, settings: TissueSettings = TissueSettings()) -> tuple[np.ndarray, float]:
    """(tissue mask (h, w) bool, saturation threshold) of an RGB uint8 image with ``mpp`` microns per pixel."""
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu
    from skimage.morphology import closing, dilation, disk, remove_small_holes, remove_small_objects

    hsv = rgb2hsv(rgb)  # (h, w, 3) in [0, 1]; the slowest step, done once
    saturation = hsv[..., 1]
    pen = pen_mask(rgb, hsv)
    pen_radius = max(int(round(PEN_DILATION_UM / mpp)), 1)
    pen = dilation(pen, disk(radius=pen_radius)) if pen.any() else pen
    candidates = saturation[~pen]
    threshold = settings.min_saturation
    if candidates.size and candidates.max() > candidates.min():
        threshold = max(float(threshold_otsu(candidates)), settings.min_saturation)
    mask = (saturation > threshold) & ~pen
    pixel_mm2 = (mpp / 1000.0) ** 2
    radius = int(round(settings.closing_um / mpp))
    if radius > 0:
        mask = closing(mask, disk(radius))
    # scikit-image >= 0.26: max_size removes objects (holes) of at most that many pixels.
    mask = remove_small_holes(mask, max_size=int(settings.min_hole_mm2 / pixel_mm2))
    mask = remove_small_objects(mask, max_size=int(settings.min_object_mm2 / pixel_mm2))
    return mask & ~pen, threshold


def read_reduced(slide: Slide, level: int, factor: int, strip_rows: int = 1024) -> np.ndarray:
    """A pyramid level shrunk ``factor`` times (box average), read in strips so that a slide without a coarse
    level (a plain tiled TIFF) never sits in memory at full size."""

    width, height = slide.level_dimensions[level]
    downsample = slide.level_downsamples[level]
    rows = max(strip_rows // factor, 1) * factor
    strips = []
    for top in range(0, height - height % factor, rows):
        count = min(rows, height - height % factor - top)
        strip = slide.read_image((0, int(round(top * downsample))), level, (width - width % factor, count))
        strips.append(np.asarray(strip.reduce(factor)))  # (count / factor, width / factor, 3)
    return np.concatenate(strips, axis=0)


def detect_tissue(slide: Slide, settings: TissueSettings = TissueSettings()) -> TissueMask:
    """The tissue mask of ``slide``, computed on the pyramid level nearest ``settings.mask_mpp``.

    Where that level is still over ``MAX_MASK_PIXELS`` (a slide without a coarse enough level), it is shrunk
    to the mask resolution while it is read.
    """
    target = settings.mask_mpp / slide.mpp
    level = slide.best_level(target)
    width, height = slide.level_dimensions[level]
    factor = max(int(target / slide.level_downsamples[level]), 1)
    if width * height > MAX_MASK_PIXELS and factor > 1:
        image = read_reduced(slide, level, factor)
    else:
        image = slide.read_level(level)
    width, height = slide.dimensions
    scale = (width / image.shape[1], height / image.shape[0])
    mask, threshold = tissue_mask(image, slide.mpp * (scale[0] + scale[1]) / 2, settings)
    logger.debug("%s: tissue mask on level %d (%dx%d), saturation threshold %.3f, %.1f%% tissue",
                 slide.path, level, image.shape[1], image.shape[0], threshold, 100 * mask.mean())
    return TissueMask(mask=mask, image=image, scale=scale, level=level, threshold=threshold)
