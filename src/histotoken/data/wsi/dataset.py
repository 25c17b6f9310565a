"""Lazy tile reads: ``read_tile`` for one tile, ``TileDataset`` over a tile table for training and prediction.

Tiles are read from the slides when asked for (coordinates from ``histotoken tile``), so a tile set of any
size costs no disk beyond its tables. OpenSlide handles are opened lazily, per process: a DataLoader
worker opens its own handles after it starts (never inherits one from the parent, which OpenSlide does
not support across fork), keyed by process id, and keeps them open for the worker's life.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from histotoken.data.wsi.reader import Slide, open_slide

logger = logging.getLogger(__name__)

MAX_OPEN_SLIDES = 32  # per process; the least recently used handle is closed beyond this
# Decoded slide tiles kept per process, shared by its open slides (OpenSlide's own cache holds 32 MiB per
# slide: less than two rows of a 40,000 px slide's JPEG tiles, so reads in grid order decoded most tiles
# twice). 256 MiB took tile reads in grid order from about 800 to 1,090 tiles/s per process.
SLIDE_CACHE_MB = int(os.environ.get("HISTOTOKEN_SLIDE_CACHE_MB", "256"))

_handles: OrderedDict[tuple[int, str], Slide] = OrderedDict()
_caches: dict[int, object] = {}  # process id -> its openslide.OpenSlideCache


def _process_cache():
    """This process's tile cache (OpenSlide >= 4.0), or None where OpenSlide cannot share one."""
    import openslide

    if SLIDE_CACHE_MB <= 0 or not hasattr(openslide, "OpenSlideCache"):
        return None
    pid = os.getpid()
    if pid not in _caches:
        _caches.clear()  # a parent's cache is never shared across fork
        try:
            _caches[pid] = openslide.OpenSlideCache(SLIDE_CACHE_MB * 2**20)
        except openslide.OpenSlideError:  # an OpenSlide library older than 4.0
            _caches[pid] = None
    return _caches[pid]


def _slide(path: str | Path, mpp: float | None = None) -> Slide:
    """This process's open handle for ``path`` (opened on first use, after any fork)."""
    key = (os.getpid(), str(path))
    slide = _handles.get(key)
    if slide is None:
        for stale in [k for k in _handles if k[0] != key[0]]:  # inherited from a parent: never use, never close
            del _handles[stale]
        # The pixel size is not needed to read coordinates; a dummy lets slides without mpp open here.
        slide = open_slide(path, mpp=mpp if mpp is not None else 1.0)
        cache = _process_cache()
        if cache is not None and hasattr(slide.handle, "set_cache"):
            slide.handle.set_cache(cache)
        _handles[key] = slide
        while len(_handles) > MAX_OPEN_SLIDES:
            _, oldest = _handles.popitem(last=False)
            oldest.close()
    else:
        _handles.move_to_end(key)
    return slide


def read_tile(
    slide_path: str | Path | Mapping,
    x: int | None = None,
    y: int | None = None,
    level: int | None = None,
    read_size: int | None = None,
    tile_size: int | None = None,
) -> torch.Tensor:
    """One tile as a uint8 tensor (3, tile_size, tile_size): a ``read_size`` square at ``level``, top-left at
    level-0 (x, y), resized to ``tile_size``. The columns of a tile table give every argument, so a table
    row (a mapping or pandas Series with those columns) may be passed alone: ``read_tile(table.iloc[i])``."""
    if isinstance(slide_path, (Mapping, pd.Series)):
        row = slide_path
        slide_path, x, y, level, read_size = row["slide_path"], row["x"], row["y"], row["level"], row["read_size"]
        tile_size = row["tile_size"] if tile_size is None else tile_size
    if any(value is None for value in (x, y, level, read_size, tile_size)):
        raise TypeError("read_tile needs slide_path, x, y, level, read_size and tile_size (or one tile-table row)")
    import openslide

    try:
        rgb = _slide(slide_path).read_tile(int(x), int(y), int(level), int(read_size), int(tile_size))  # (S, S, 3)
    except (openslide.OpenSlideError, OSError) as error:  # OpenSlideError is a plain Exception: name the slide
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{slide_path}: the tile at ({int(x)}, {int(y)}) on level {int(level)} cannot be read "
                         f"({type(error).__name__}: {detail}); the slide file is damaged") from None
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))  # (S, S, 3) -> (3, S, S)


class TileDataset(Dataset):
    """``(image, class index)`` pairs read lazily from the slides of a tile table.

    ``table`` has the tile-table columns (``formats.TILE_COLUMNS``); ``class_names`` are the classes of the
    ``label`` column (``normal``, ``tumor``); rows with an unknown (empty) label get target -1 (usable for
    prediction, not for training). Images are uint8 (3, S, S) tensors (S = ``image_size`` or each row's
    ``tile_size``) passed through ``transform``, as ``ImageDataset`` images are.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        class_names: Sequence[str],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        image_size: int | None = None,
        label_column: str = "label",
    ) -> None:
        lookup = {name: index for index, name in enumerate(class_names)}
        labels = table[label_column].fillna("").astype(str)
        unknown = sorted(set(labels) - set(lookup) - {""})
        if unknown:
            raise ValueError(f"tile labels {unknown} are not in the classes {list(class_names)}")
        self.table = table.reset_index(drop=True)
        self.targets = torch.tensor([lookup.get(label, -1) for label in labels], dtype=torch.long)
        self.transform = transform
        self.image_size = image_size
        # Plain arrays: cheap to pickle into workers and to index per item.
        self._paths = self.table["slide_path"].astype(str).to_numpy()
        self._coords = self.table[["x", "y", "level", "read_size", "tile_size"]].to_numpy(dtype=np.int64)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, level, read_size, tile_size = self._coords[index]
        image = read_tile(self._paths[index], x, y, level, read_size, self.image_size or tile_size)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]
