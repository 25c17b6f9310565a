"""One guarded decoder for every image file the tool reads: index checks, store builds, predict, explain.

:func:`decode_array` turns a PNG, JPEG, TIFF, BMP or WebP file into an (H, W, 3) uint8 RGB array, or
raises ValueError with one line naming the file. Index probing and training call the same function, so
a file that ``index`` accepts is a file that trains. Guarantees:

- **Pixel limit**: width x height from the header is checked before anything is decoded; beyond
  ``max_pixels`` (argument, else ``$HISTOTOKEN_MAX_PIXELS``, else 100 Mpx = 10,000 x 10,000) the file
  is refused. A decompression bomb costs a header read.
- **Truncated or corrupt data** is an error for that file, never a crash: decoding is Pillow's (its
  chunk and length checks; ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set). torchvision's
  ``decode_image`` is not used for files: its libpng path crashed the process (SIGSEGV) on a PNG whose
  image data was shorter than its header said.
- **Bit depths**: 16-bit and 32-bit integer images are scaled to 0-255 by their range
  (``round(v * 255 / 65535)`` for 16 bit), never truncated to their low byte; float images are taken
  as 0-1 when their maximum is at most 1, else as 0-255, and clipped. 16-bit RGB PNGs come through
  Pillow as the high byte of each sample (``v // 256``, within 1 of the rounded value); TIFFs Pillow
  cannot read (16-bit RGB, planar, float RGB) are read with tifffile.
- **Channels**: grayscale, palette, 1-bit and CMYK images become RGB; alpha is dropped (the colour
  samples are kept as stored). Each conversion is logged once, naming the file.
- **Pages**: a multi-page TIFF (or animated image) gives its first page.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
TIFF_SUFFIXES = (".tif", ".tiff")
MAX_PIXELS_ENV = "HISTOTOKEN_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 10_000 * 10_000
_CONVERTED_MODES = {
    "1": "1-bit", "L": "grayscale", "LA": "grayscale+alpha", "La": "grayscale+alpha", "P": "palette",
    "PA": "palette+alpha", "RGBA": "RGBA", "RGBa": "RGBA", "RGBX": "RGBX", "CMYK": "CMYK", "YCbCr": "YCbCr",
    "LAB": "Lab", "HSV": "HSV", "I": "32-bit integer", "F": "floating-point",
}


def max_pixels() -> int:
    """The pixel limit: ``$HISTOTOKEN_MAX_PIXELS`` when set, else 100 Mpx."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        raise ValueError(f"{MAX_PIXELS_ENV}={raw!r} is not a number; set it to a pixel count such as 100000000") from None
    if value <= 0:
        raise ValueError(f"{MAX_PIXELS_ENV}={raw!r} must be a positive pixel count")
    return value


def decode_array(path: str | Path, limit: int | None = None) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 RGB array; ValueError naming the file otherwise."""
    path = Path(path)
    limit = max_pixels() if limit is None else int(limit)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ValueError(f"cannot read image {path}: {error.strerror or error}") from None
    if size == 0:
        raise ValueError(f"cannot decode image {path}: empty file (0 bytes). Re-export or remove the file")
    try:
        array = _decode_with_pillow(path, limit)
        if array is None:
            array = _decode_tiff(path, limit)
    except _TooLarge as error:
        raise ValueError(
            f"image {path} declares {error.width} x {error.height} pixels, more than the limit of {limit:,}; "
            f"it may be a decompression bomb. If it is a real image, raise {MAX_PIXELS_ENV}"
        ) from None
    except MemoryError:
        raise ValueError(f"cannot decode image {path}: not enough memory; lower {MAX_PIXELS_ENV}") from None
    except Exception as error:  # noqa: BLE001 - any decoder failure is this file's error, never the call's
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"cannot decode image {path}: not a readable image ({reason}). Re-export or remove the file") from None
    return array


def decode_image(path: str | Path, limit: int | None = None) -> torch.Tensor:
    """:func:`decode_array` as a contiguous (3, H, W) uint8 tensor."""
    import torch

    array = decode_array(path, limit)  # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # (3, H, W)


def probe_image(path: str | Path, limit: int | None = None) -> tuple[int, int]:
    """Decode an image completely, as training will; return (width, height) or raise ValueError."""
    array = decode_array(path, limit)
    return array.shape[1], array.shape[0]


def size_or_skip(path: Path, check: bool, skipped: list[tuple[str, str]]) -> tuple[int, int] | None:
    """(width, height) of a checked image ((0, 0) unchecked), or None after adding (path, reason) to ``skipped``."""
    if not check:
        return 0, 0
    try:
        return probe_image(path)
    except ValueError as error:
        skipped.append((str(path), str(error)))
        return None


# --------------------------------------------------------------------------- decoders


class _TooLarge(Exception):
    def __init__(self, width: int, height: int) -> None:
        super().__init__(f"{width} x {height}")
        self.width, self.height = width, height


def _check_size(width: int, height: int, limit: int) -> None:
    if width * height > limit:
        raise _TooLarge(width, height)


@contextlib.contextmanager
def _pillow_bomb_guard(limit: int) -> Iterator[None]:
    """Our limit replaces Pillow's (which warns above 89 Mpx and refuses twice that)."""
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(limit, previous or 0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _decode_with_pillow(path: Path, limit: int) -> np.ndarray | None:
    """The RGB array, or None for a TIFF whose sample layout Pillow does not read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _pillow_bomb_guard(limit), Image.open(path) as image:
            _check_size(*image.size, limit)  # header only: nothing is decoded yet
            image.seek(0)
            if image.format == "TIFF" and image.mode not in ("I;16", "I;16B", "I;16L") and _deep_samples(image):
                return None  # Pillow keeps the high byte of 16-bit RGB; tifffile's samples are scaled exactly
            try:
                image.load()
            except (OSError, ValueError, KeyError, SyntaxError):
                if path.suffix.lower() in TIFF_SUFFIXES or image.format == "TIFF":
                    return None  # e.g. 16-bit RGB or planar TIFF: tifffile reads those
                raise
            return _to_rgb(image, path)
    except Image.DecompressionBombError:
        raise _TooLarge(*_header_size(path)) from None
    except UnidentifiedImageError:
        if path.suffix.lower() in TIFF_SUFFIXES:
            return None
        raise ValueError("unknown or damaged format") from None


def _deep_samples(image) -> bool:
    bits = image.tag_v2.get(258, (8,))  # BitsPerSample
    bits = bits if isinstance(bits, tuple) else (bits,)
    return max(bits) > 8


def _header_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # read the header only, to name the size in the message
    try:
        with Image.open(path) as image:
            return image.size
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _to_rgb(image, path: Path) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    if mode in _CONVERTED_MODES and mode not in ("I", "F"):
        logger.warning("%s is a %s image; converted to RGB", path, _CONVERTED_MODES[mode])
        if mode in ("RGBA", "RGBa", "RGBX"):
            return np.asarray(image, dtype=np.uint8)[..., :3].copy()  # alpha dropped, colours as stored
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    # Integer and float modes: I;16 (16-bit grayscale PNG/TIFF), I;16B, I (32-bit), F (float)
    array = np.asarray(image)
    logger.warning("%s is a %s grayscale image; scaled to 8-bit RGB", path, _depth_name(mode, array))
    return np.repeat(scale_to_uint8(array, mode)[..., None], 3, axis=2)


def _depth_name(mode: str, array: np.ndarray) -> str:
    if mode.startswith("I;16"):
        return "16-bit"
    return _CONVERTED_MODES.get(mode, f"{array.dtype} ({mode})")


def scale_to_uint8(array: np.ndarray, mode: str = "") -> np.ndarray:
    """Scale an integer or float image to uint8 by its type's range (16 bit: ``round(v * 255 / 65535)``)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "f":
        values = np.nan_to_num(array.astype(np.float64), nan=0.0)
        peak = 1.0 if values.size and values.max() <= 1.0 else 255.0
        return np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)
    if array.dtype.kind == "b":
        return array.astype(np.uint8) * 255
    if mode.startswith("I;16") or array.dtype.itemsize == 2:
        top = 65535.0
    elif mode == "I" and (array.size == 0 or array.max() <= 65535):
        top = 65535.0  # Pillow widens 16-bit samples to 32-bit "I"
    else:
        top = float(np.iinfo(array.dtype).max)
    values = np.clip(array.astype(np.float64), 0, top)
    return np.rint(values * (255.0 / top)).astype(np.uint8)


def _decode_tiff(path: Path, limit: int) -> np.ndarray:
    """First page of a TIFF that Pillow cannot read, through tifffile (size checked from the tags first)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.pages:
            raise ValueError("TIFF file has no pages")
        page = tif.pages.first
        shape = page.shape
        axes = page.axes
        height = shape[axes.index("Y")] if "Y" in axes else shape[0]
        width = shape[axes.index("X")] if "X" in axes else shape[1]
        _check_size(int(width), int(height), limit)
        array = page.asarray()
        axes = page.axes
    if "S" in axes and axes.index("S") == 0:  # planar: (S, Y, X) -> (Y, X, S)
        array = np.moveaxis(array, 0, -1)
    while array.ndim > 3 and array.shape[0] == 1:  # leading length-1 axes (e.g. a sample axis of 1)
        array = array[0]
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
        logger.warning("%s is a grayscale image; converted to RGB", path)
    if array.ndim != 3 or array.shape[2] < 3:
        raise ValueError(f"TIFF page of shape {tuple(shape)} ({axes}) is not an RGB or grayscale image")
    if array.shape[2] > 3:
        logger.warning("%s has %d samples a pixel; kept the first 3 as RGB", path, array.shape[2])
    return np.ascontiguousarray(scale_to_uint8(array[..., :3]))
