"""Image transforms (torchvision.transforms.v2) on cached uint8 tensors.

Images are decoded and resized once (see ``dataset.ImageStore``); these transforms then run
on (3, S, S) uint8 tensors. Histology has no canonical orientation, so training uses flips and
right-angle rotations; colour jitter stands in for stain variation between labs and scanners.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2


def train_transform(img_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Rotations, flips, zoom (random resized crop) and colour/stain jitter, then normalisation."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(img_size, scale=(0.5, 1.0), ratio=(0.8, 1.25), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomChoice([v2.RandomRotation((angle, angle)) for angle in (0, 90, 180, 270)]),
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
