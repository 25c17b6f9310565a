"""Datasets over a split table: decode and resize each image once, train from the decoded store.

Decoding a 700x460 PNG costs about 6 ms and would dominate small-image training, so every
image is decoded once into a uint8 store at the model's input size (all of BreakHis at 224 px is
about 1.2 GB). The store is a memory-mapped file in the cache (see ``data.store``, which also holds
``load_image``: one image decoded and resized as the store does it), shared by
every run and evaluation of a study that uses the same images, size and preprocessing.
Unreadable images are left out and listed, so a bad file never crashes an epoch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from histotoken.data.store import build_store, load_image  # noqa: F401 - load_image is re-exported here

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ImageStore:
    """Decoded images of a table, in row order; rows that could not be decoded are dropped and listed."""

    images: torch.Tensor  # (N, 3, S, S) uint8 (memory-mapped when it is a whole cached store)
    frame: pd.DataFrame  # the rows that were decoded, re-indexed 0..N-1
    skipped: list[tuple[str, str]]  # (path, reason)

    @classmethod
    def build(
        cls,
        frame: pd.DataFrame,
        img_size: int,
        progress: Callable[[int, int], None] | None = None,
        *,
        universe: pd.DataFrame | None = None,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        preprocess_key: str = "",
        workers: int = 0,
        cache_dir: str | Path | None = None,
    ) -> ImageStore:
        """The images of ``frame``'s rows, from the decoded store of ``universe`` (default: ``frame``).

        Pass the run's whole split as ``universe`` so that every run and evaluation of a study opens
        one store (decoded once, also across processes) and selects its rows from it.
        ``preprocess`` (named by ``preprocess_key``) runs on each decoded uint8 image before storing.
        """
        source = frame if universe is None else universe
        keys = frame["path"].astype(str)
        if universe is not None:
            outside = sorted(set(keys) - set(universe["path"].astype(str)))
            if outside:
                raise ValueError(f"{len(outside)} images of the selection are not in the universe, e.g. {outside[0]}")
        store = build_store(
            source["path"].astype(str).tolist(), img_size, preprocess, preprocess_key, workers, cache_dir, progress
        )
        position = {key: row for row, key in enumerate(store.keys)}
        rows = np.array([position[key] for key in keys], dtype=np.int64)
        bad = np.array([row in store.errors for row in rows], dtype=bool)
        skipped = [(key, store.errors[row]) for key, row in zip(keys[bad], rows[bad])]
        if skipped:
            logger.warning("%d images could not be decoded and are left out, e.g. %s", len(skipped), skipped[0][1])
        rows = rows[~bad]
        if len(rows) == 0:
            raise ValueError("none of the images could be decoded; see the warnings above for the files")
        images = torch.from_numpy(store.images)
        if not (len(rows) == len(store.keys) and np.array_equal(rows, np.arange(len(rows)))):
            images = images[torch.from_numpy(rows)]  # a copy of the selected rows
        return cls(images, frame[~bad].reset_index(drop=True), skipped)


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
