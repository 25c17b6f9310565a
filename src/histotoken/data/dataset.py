"""Datasets over a split table: decode and resize each image once, train from the cached tensors.

Decoding a 700x460 PNG costs about 6 ms and would dominate small-image training, so every
image is decoded once into a uint8 store at the model's input size (all of BreakHis at 224 px is
about 1.2 GB). Unreadable images are left out when the store is built and listed, so a bad file
never crashes an epoch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import pandas as pd
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

logger = logging.getLogger(__name__)


def load_image(path: str, img_size: int) -> torch.Tensor:
    """Decode an image file to a (3, img_size, img_size) uint8 tensor.

    Grayscale and RGBA images are converted to RGB with a warning naming the file; unreadable,
    truncated or empty files raise ValueError naming the file.
    """
    try:
        image = decode_image(path, mode=ImageReadMode.UNCHANGED)
        if image.shape[0] != 3:
            kind = {1: "grayscale", 2: "grayscale+alpha", 4: "RGBA"}.get(image.shape[0], f"{image.shape[0]}-channel")
            logger.warning("%s is a %s image; converted to RGB (BreakHis images are RGB)", path, kind)
            image = decode_image(path, mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as error:
        raise ValueError(f"cannot decode image {path}: {error}. Re-export or remove the file, then re-index") from error
    return F.resize(image, [img_size, img_size], antialias=True)


@dataclasses.dataclass
class ImageStore:
    """Decoded images of a table, in row order; rows that could not be decoded are dropped and listed."""

    images: torch.Tensor  # (N, 3, S, S) uint8
    frame: pd.DataFrame  # the rows that were decoded, re-indexed 0..N-1
    skipped: list[tuple[str, str]]  # (path, reason)

    @classmethod
    def build(cls, frame: pd.DataFrame, img_size: int, progress: Callable[[int, int], None] | None = None) -> ImageStore:
        images, kept, skipped = [], [], []
        for position, path in enumerate(frame["path"]):
            try:
                images.append(load_image(str(path), img_size))
                kept.append(position)
            except ValueError as error:
                logger.warning("left out: %s", error)
                skipped.append((str(path), str(error)))
            if progress is not None:
                progress(position + 1, len(frame))
        if not images:
            raise ValueError("none of the images could be decoded; see the warnings above for the files")
        return cls(torch.stack(images), frame.iloc[kept].reset_index(drop=True), skipped)


class ImageDataset(Dataset):
    """(image, class index) pairs from an ImageStore; ``class_column`` holds the class names."""

    def __init__(
        self,
        store: ImageStore,
        class_names: Sequence[str],
        class_column: str,
        transform: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        lookup = {name: index for index, name in enumerate(class_names)}
        unknown = sorted(set(store.frame[class_column]) - set(lookup))
        if unknown:
            raise ValueError(f"class names {unknown} are not in this task's classes {list(class_names)}")
        self.store = store
        self.targets = torch.tensor([lookup[name] for name in store.frame[class_column]], dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.store.images[index]), self.targets[index]


def class_column(task: str) -> str:
    """The index column that holds a task's class: ``label`` (binary) or ``tumor_class`` (subtype)."""
    return "label" if task == "binary" else "tumor_class"
