"""Image transforms (torchvision.transforms.v2) on cached uint8 tensors.

Images are decoded and resized once (see ``dataset.ImageStore``); these transforms then run
on (3, S, S) uint8 tensors. Histology has no canonical orientation, so training uses flips and
right-angle rotations; colour jitter stands in for stain variation between labs and scanners, and
``stain_augment="hed"`` adds HED stain jitter (Tellez et al., 2018) in front of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

# HED jitter strength: Tellez et al.'s "HED-light" setting (scale and shift each within +-0.05).
HED_SCALE_SIGMA = 0.05
HED_SHIFT_SIGMA = 0.05


def hed_jitter(image: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Scale and shift the haematoxylin, eosin and DAB amounts of a (3, H, W) uint8 image.

    Optical density (natural log, Beer-Lambert) is deconvolved with Ruifrok & Johnston's stain matrix
    (scikit-image's ``hed_from_rgb``); each amount ``s`` becomes ``s * scale[c] + shift[c]`` (shift in
    optical-density units) and the result is recomposed with ``rgb_from_hed``. Amounts are not
    clipped, so ``scale = 1, shift = 0`` returns the image unchanged.
    """
    from skimage.color import hed_from_rgb, rgb_from_hed

    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"HED jitter takes (3, H, W) uint8 images; got {image.dtype} {tuple(image.shape)}")
    channels, height, width = image.shape
    # Row-vector convention of scikit-image: stains (N, 3) = optical density (N, 3) @ hed_from_rgb.
    to_hed = torch.as_tensor(hed_from_rgb, dtype=torch.float32)
    to_rgb = torch.as_tensor(rgb_from_hed, dtype=torch.float32)
    light = (image.reshape(3, -1).T.float() / 255).clamp_min(1e-6)  # (3, H, W) -> (H*W, 3) in (0, 1]
    stains = -torch.log(light) @ to_hed  # (H*W, 3): haematoxylin, eosin, DAB amounts
    light = torch.exp(-((stains * scale + shift) @ to_rgb))  # (H*W, 3)
    rgb = (light * 255).round().clamp(0, 255).to(torch.uint8)
    return rgb.T.reshape(channels, height, width)  # (H*W, 3) -> (3, H, W)


class RandomHEDJitter(torch.nn.Module):
    """HED colour augmentation (Tellez et al., 2018) on (3, H, W) uint8 images.

    Tellez, Balkenhol et al., "Whole-slide mitosis detection in H&E breast histology using PHH3 as
    a reference to train distilled stain-invariant convolutional networks", IEEE TMI 2018. The image
    is deconvolved into haematoxylin, eosin and DAB amounts and each amount ``s`` becomes
    ``s * alpha + beta`` with ``alpha ~ U(1 - scale_sigma, 1 + scale_sigma)`` and
    ``beta ~ U(-shift_sigma, shift_sigma)`` (optical-density units), drawn per image and channel
    (see ``hed_jitter``). With both sigmas 0 the map is the identity.
    """

    def __init__(self, scale_sigma: float = HED_SCALE_SIGMA, shift_sigma: float = HED_SHIFT_SIGMA) -> None:
        super().__init__()
        if scale_sigma < 0 or shift_sigma < 0:
            raise ValueError(f"HED jitter sigmas must be at least 0; got {scale_sigma}, {shift_sigma}")
        self.scale_sigma = scale_sigma
        self.shift_sigma = shift_sigma

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        scale = torch.empty(3).uniform_(1 - self.scale_sigma, 1 + self.scale_sigma)
        shift = torch.empty(3).uniform_(-self.shift_sigma, self.shift_sigma)
        return hed_jitter(image, scale, shift)

    def extra_repr(self) -> str:
        return f"scale_sigma={self.scale_sigma}, shift_sigma={self.shift_sigma}"


def train_transform(
    img_size: int, mean: Sequence[float], std: Sequence[float], stain_augment: str = "none"
) -> v2.Compose:
    """Rotations, flips, zoom (random resized crop), HED jitter if asked, colour/stain jitter, then normalisation."""
    if stain_augment not in ("none", "hed"):
        raise ValueError(f"stain_augment must be none or hed; got {stain_augment!r}")
    stain = [RandomHEDJitter()] if stain_augment == "hed" else []
    return v2.Compose(
        [
            v2.RandomResizedCrop(img_size, scale=(0.5, 1.0), ratio=(0.8, 1.25), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomChoice([v2.RandomRotation((angle, angle)) for angle in (0, 90, 180, 270)]),
            *stain,
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.04),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Normalisation only: the cached image already has the model's input size."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))])


def model_normalisation(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std from the model's timm data config (ImageNet statistics for most models)."""
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(model)
    return tuple(config["mean"]), tuple(config["std"])
