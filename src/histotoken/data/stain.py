"""Stain normalisation with torchstain, applied once to every image when the decoded store is built.

Stain colour varies between labs and scanners. A normaliser is fitted once on a target image
and then maps each image's stain appearance onto the target's:

- Macenko et al. (2009), "A method for normalizing histology slides for quantitative analysis",
  ISBI: the two stain vectors (haematoxylin, eosin) are estimated per image in optical-density
  space and the image is re-synthesised with the target's vectors and maximum concentrations;
- Reinhard et al. (2001), "Color transfer between images", IEEE CG&A: each LAB channel's mean and
  standard deviation are matched to the target's.

Both come from ``torchstain`` (PyTorch backend); this module only adds what the toolkit needs
around them: a content key for the store cache, a check that an image has tissue to fit (a blank
or background-only tile is left unnormalised with a warning naming it), and saving the target and
its fitted parameters in the run folder so that evaluation normalises test images the same way.
Vahadane et al. (2016) is named by the issue but torchstain's PyTorch backend does not provide it
(torchstain 1.4 has Macenko, multi-target Macenko and Reinhard); asking for it is a clear error.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from histotoken.data.store import PreprocessSkipped
from histotoken.formats import RunPaths
from histotoken.io import atomic_write_bytes, atomic_write_json, read_json

logger = logging.getLogger(__name__)

# Part of every store key: bump it when the normalisation of an image changes (thresholds, checks).
STAIN_VERSION = 1
# Choices of RunConfig.stain_norm (config.py repeats them for validation without importing torch).
STAIN_NORM_METHODS = ("none", "macenko", "reinhard", "vahadane")
# torchstain's transmitted-light intensity and transparency threshold (its own defaults): a pixel
# is tissue when its optical density is at least TISSUE_OD_THRESHOLD in every channel.
LIGHT_INTENSITY = 240
TISSUE_OD_THRESHOLD = 0.15
# An image with less tissue than this share of its pixels is not fitted (left unnormalised).
MIN_TISSUE_FRACTION = 0.01
# Macenko needs two stain colours: the second-largest eigenvalue of the tissue's optical-density
# covariance must be at least this share of the largest (a grey or one-colour image has about 0).
MIN_SECOND_STAIN_SHARE = 1e-3
# Reinhard divides by each LAB channel's standard deviation: a channel flatter than this is not fitted.
MIN_LAB_STD = 0.5


class StainFitError(PreprocessSkipped):
    """The stain model could not be fitted on an image (blank or background-only).

    The decoded store catches it (as ``PreprocessSkipped``), keeps the image unnormalised and warns,
    naming the file.
    """


def tissue_fraction(image: torch.Tensor) -> float:
    """Share of pixels of a (3, H, W) uint8 image that are stained tissue (Macenko's criterion)."""
    return float(_tissue_optical_density(image).shape[1]) / max(1, image.shape[1] * image.shape[2])


def _tissue_optical_density(image: torch.Tensor) -> torch.Tensor:
    optical_density = -torch.log((image.reshape(3, -1).float() + 1) / LIGHT_INTENSITY)  # (3, H*W)
    return optical_density[:, (optical_density >= TISSUE_OD_THRESHOLD).all(dim=0)]  # (3, tissue pixels)


def check_fittable(image: torch.Tensor, method: str) -> None:
    """Raise StainFitError when ``method`` cannot be fitted on ``image`` (blank, background-only, one colour)."""
    fraction = tissue_fraction(image)
    if fraction < MIN_TISSUE_FRACTION:
        raise StainFitError(f"only {fraction:.1%} of its pixels are tissue, fewer than {MIN_TISSUE_FRACTION:.0%}")
    if method == "macenko":
        tissue = _tissue_optical_density(image)
        eigenvalues = torch.linalg.eigvalsh(torch.cov(tissue))  # ascending
        if eigenvalues[1] < MIN_SECOND_STAIN_SHARE * eigenvalues[2].clamp_min(1e-12):
            raise StainFitError("its tissue shows one stain colour only (grey or uniform), not two")
    else:
        from torchstain.torch.utils.rgb2lab import rgb2lab
        from torchstain.torch.utils.split import lab_split

        lab_stds = [float(channel.std()) for channel in lab_split(rgb2lab(image.float() / 255))]
        if min(lab_stds) < MIN_LAB_STD:
            raise StainFitError(f"a LAB channel is flat (standard deviations {[round(x, 2) for x in lab_stds]})")


class StainNormaliser:
    """A fitted torchstain normaliser as a picklable callable on (3, H, W) uint8 tensors.

    ``normaliser(image)`` returns the normalised image (same shape, uint8), or raises StainFitError
    when the stain model cannot be fitted on ``image`` (too little tissue, or a degenerate fit):
    the decoded store then keeps the image as it is and warns, naming the file. Elsewhere (e.g.
    prediction) ``normalise_or_keep(image, source)`` does the same in one call. ``key`` names the
    method, the torchstain version and a hash of the target's pixels, for the store's cache key.
    """

    def __init__(self, method: str, target: torch.Tensor, target_name: str = "the stain target") -> None:
        import torchstain

        version = _torchstain_version()
        if method == "vahadane":
            raise ValueError(
                f"stain normalisation 'vahadane' is not available in torchstain {version} "
                "(its PyTorch backend has macenko and reinhard); choose --stain-norm macenko or reinhard"
            )
        if method not in ("macenko", "reinhard"):
            raise ValueError(f"unknown stain normalisation {method!r}; choose one of {STAIN_NORM_METHODS[1:]}")
        _check_image(target, target_name)
        self.method = method
        self.target = target
        if method == "macenko":
            self._normaliser = torchstain.normalizers.MacenkoNormalizer(backend="torch")
        else:
            self._normaliser = torchstain.normalizers.ReinhardNormalizer(backend="torch")
        try:
            self._fit(target)
        except StainFitError as error:
            raise ValueError(
                f"{target_name} cannot serve as a stain target ({error}); choose an H&E image that shows tissue"
            ) from None
        digest = hashlib.sha256(f"{tuple(target.shape)}".encode() + target.contiguous().numpy().tobytes())
        self.key = f"{method}-v{STAIN_VERSION}-torchstain{version}-{digest.hexdigest()[:16]}"

    def _fit(self, target: torch.Tensor) -> None:
        check_fittable(target, self.method)
        try:
            self._normaliser.fit(target)
        except (RuntimeError, IndexError) as error:
            raise StainFitError(f"torchstain could not fit it: {error}") from None
        if not all(torch.isfinite(value).all() for value in self.parameters().values()):
            raise StainFitError("the fitted stain parameters are not finite")

    def parameters(self) -> dict[str, torch.Tensor]:
        """The fitted target parameters: Macenko's stain matrix and maximum concentrations, or LAB statistics."""
        if self.method == "macenko":
            # HE: (3, 2) optical-density stain vectors (R, G, B) of haematoxylin and eosin, as columns.
            return {"stain_matrix_he": self._normaliser.HERef, "max_concentrations": self._normaliser.maxCRef}
        return {"lab_means": self._normaliser.target_means, "lab_stds": self._normaliser.target_stds}

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Normalise one (3, H, W) uint8 image; raises StainFitError when it cannot be fitted."""
        check_fittable(image, self.method)
        try:
            if self.method == "macenko":
                result, _, _ = self._normaliser.normalize(image, Io=LIGHT_INTENSITY, stains=False)  # (H, W, 3) int
            else:
                result = self._normaliser.normalize(image)  # (H, W, 3) uint8
        except (RuntimeError, IndexError) as error:
            raise StainFitError(f"torchstain could not fit it: {error}") from None
        result = result.permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
        # torchstain casts to integers itself: a degenerate fit (NaN) shows up as out-of-range values.
        if self.method == "macenko" and (result.min() < 0 or result.max() > 255):
            raise StainFitError("the fitted stain concentrations are not finite")
        return result.to(torch.uint8).contiguous()

    def normalise_or_keep(self, image: torch.Tensor, source: str) -> torch.Tensor:
        """The normalised image, or ``image`` itself with a warning naming ``source`` when it cannot be fitted."""
        try:
            return self(image)
        except StainFitError as error:
            logger.warning(
                "stain normalisation (%s) left %s unnormalised: %s",
                self.method, source, error,
            )
            return image

    def save(self, target_image: Path, parameters_file: Path, target_source: str = "") -> None:
        """Write the target's pixels (lossless PNG) and its fitted parameters (JSON) into a run folder."""
        from torchvision.io import encode_png

        atomic_write_bytes(target_image, encode_png(self.target).numpy().tobytes())
        atomic_write_json(
            parameters_file,
            {
                "method": self.method,
                "key": self.key,
                "target_image": target_image.name,
                "target_source": target_source,
                "light_intensity": LIGHT_INTENSITY,
                "tissue_od_threshold": TISSUE_OD_THRESHOLD,
                "min_tissue_fraction": MIN_TISSUE_FRACTION,
                **{name: value.tolist() for name, value in self.parameters().items()},
            },
        )


def _torchstain_version() -> str:
    from importlib.metadata import version

    return version("torchstain")  # torchstain.__version__ lags behind its releases


def _check_image(image: torch.Tensor, name: str) -> None:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"{name} must be a (3, H, W) uint8 RGB image; got {image.dtype} {tuple(image.shape)}")


def read_target(path: str | Path) -> torch.Tensor:
    """Decode a stain target image to a (3, H, W) uint8 RGB tensor, with errors naming the file."""
    from histotoken.data.decode import decode_image

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"stain target image {path} does not exist; give --stain-target an H&E image file")
    try:
        return decode_image(path)
    except ValueError as error:
        raise ValueError(f"stain target: {error}; give a PNG, JPEG, TIFF, BMP or WebP image") from None


def make_stain_normaliser(method: str, target_path: str | Path) -> tuple[StainNormaliser, str]:
    """A normaliser fitted on the image at ``target_path``, and its store cache key.

    The normaliser maps a (3, H, W) uint8 tensor to a uint8 tensor of the same shape (pass it to
    ``ImageStore.build(..., preprocess=normaliser, preprocess_key=key)``); on a blank or
    background-only image it raises StainFitError, which the store turns into a warning naming the file.
    """
    if method not in STAIN_NORM_METHODS or method == "none":
        raise ValueError(f"unknown stain normalisation {method!r}; choose one of {STAIN_NORM_METHODS[1:]}")
    normaliser = StainNormaliser(method, read_target(target_path), f"stain target {target_path}")
    return normaliser, normaliser.key


def run_stain_normaliser(
    method: str, target_path: str | Path | None, run_dir: str | Path
) -> tuple[StainNormaliser | None, str]:
    """The run's stain normaliser and store key, for training; ``(None, "")`` when ``method`` is ``none``.

    The first call of a run fits on ``target_path`` and saves the target and its fitted
    parameters in the run folder (RunPaths.stain_target, RunPaths.stain); later calls (a resumed
    run) fit on the saved copy, so the run folder alone reproduces it.
    """
    if method == "none":
        return None, ""
    paths = RunPaths(Path(run_dir))
    if paths.stain_target.is_file():
        saved = _read_saved_method(paths.stain)
        if saved is not None and saved != method:
            raise ValueError(
                f"{paths.stain} records stain normalisation {saved!r}, not {method!r}; "
                "use a new run folder for another method"
            )
        return make_stain_normaliser(method, paths.stain_target)
    if not target_path:
        raise ValueError(
            f"stain normalisation {method!r} needs a target image: give --stain-target IMAGE "
            f"(or stain_target: in the config); {paths.stain_target} does not exist either"
        )
    normaliser, key = make_stain_normaliser(method, target_path)
    normaliser.save(paths.stain_target, paths.stain, str(Path(target_path).expanduser().resolve()))
    logger.info("stain target %s (%s) saved as %s", target_path, method, paths.stain_target)
    return normaliser, key


def saved_stain_normaliser(run_dir: str | Path) -> tuple[StainNormaliser | None, str]:
    """The stain normaliser a trained run used (from its stain.json and target copy), or ``(None, "")``.

    For everything that reads a finished run folder: evaluation, prediction, export.
    """
    paths = RunPaths(Path(run_dir))
    method = _read_saved_method(paths.stain)
    if method is None:
        return None, ""
    if not paths.stain_target.is_file():
        raise FileNotFoundError(
            f"{paths.stain} names stain normalisation {method!r} but {paths.stain_target} is missing; "
            "restore it from the run's copy, or train the run again"
        )
    return make_stain_normaliser(method, paths.stain_target)


def _read_saved_method(path: Path) -> Any:
    return read_json(path).get("method") if path.is_file() else None
