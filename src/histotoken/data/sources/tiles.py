"""Whole-slide-image tiles as a data source: the folder ``histotoken tile`` writes.

Recognised by ``summary.csv`` beside a ``tiles/`` folder of ``<slide>.parquet`` tables. Keys are
``<root>/tiles/<slide>.parquet#<row>``; a tile is read from its slide through
:func:`histotoken.data.wsi.read_tile`. Classes are the sorted tile labels; tiles without a label are
listed as skipped; ``patient_id`` is the table's. Any failure of the slide library while reading a
tile (``OpenSlideError`` is a plain Exception) becomes a ValueError naming the slide and the tile, so
one bad slide costs its own tiles only.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from histotoken.data.sources import (
    NO_MAGNIFICATION,
    DataSource,
    IndexResult,
    SourceWords,
    rebase_record_keys,
    split_key,
)
from histotoken.formats import KEY_SEPARATOR, TILE_SUMMARY, TILE_TABLES_DIR

if TYPE_CHECKING:
    import pandas as pd
    import torch

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=64)
def _tile_table(path: str) -> pd.DataFrame:
    import pandas as pd

    return pd.read_parquet(path)


def read_tile_row(path: str, row: int) -> torch.Tensor:
    """Tile ``row`` of a tile table as a (3, H, W) uint8 tensor, read from its slide; ValueError naming both."""
    from histotoken.data import wsi  # owned by the slide reader; imported only when tiles are read

    try:
        table = _tile_table(path)
    except Exception as error:  # noqa: BLE001 - pyarrow raises its own types for damaged tables
        raise ValueError(f"cannot read tile table {path}: {error}. Re-run the tiling") from None
    if not 0 <= row < len(table):
        raise ValueError(f"{path} has {len(table)} tiles; tile {row} does not exist. Re-index the tiles")
    tile = table.iloc[row]
    try:
        return wsi.read_tile(tile)
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001 - OpenSlideError and friends: this tile's error, named
        slide = tile.get("slide_path", "?")
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"cannot read tile {row} of {path} from slide {slide}: {reason}. Check or re-scan the slide"
        ) from None


class TilesSource:
    name = "tiles"
    words = SourceWords(
        group="patient", groups="patients", class_word="class", classes_word="classes",
        has_magnification=False, description="whole-slide-image tiles",
    )
    decodes_images = False
    key_suffix = ".parquet"

    def detect(self, root: Path) -> bool:
        return (root / TILE_SUMMARY).is_file() and (root / TILE_TABLES_DIR).is_dir()

    def scan(self, root: Path, groups: str | Path | None = None) -> IndexResult:
        """One row per labelled tile of ``ROOT/tiles/<slide>.parquet``."""
        import pandas as pd

        frames, skipped = [], []
        for parquet in sorted((root / TILE_TABLES_DIR).glob("*.parquet")):
            table = pd.read_parquet(parquet)
            missing = [c for c in ("label", "patient_id") if c not in table.columns]
            if missing:
                raise ValueError(f"tile table {parquet} lacks columns {missing}; re-run the tiling with labels")
            labels = table["label"].fillna("").astype(str)
            keys = pd.Series([f"{parquet}{KEY_SEPARATOR}{i}" for i in range(len(table))])
            unlabelled = (labels == "").to_numpy()
            skipped.extend((key, "tile has no label (unknown class); not usable for training") for key in keys[unlabelled])
            kept = ~unlabelled
            size = table["tile_size"].to_numpy()[kept] if "tile_size" in table else 0
            frames.append(pd.DataFrame({
                "path": keys[kept].to_numpy(), "patient_id": table["patient_id"].astype(str).to_numpy()[kept],
                "tumor_class": labels[kept].to_numpy(), "label": labels[kept].to_numpy(),
                "magnification": NO_MAGNIFICATION, "width": size, "height": size,
            }))
        if not frames:
            raise ValueError(f"{root / TILE_TABLES_DIR} holds no <slide>.parquet tile tables; tile the slides first")
        frame = pd.concat(frames, ignore_index=True)
        if frame.empty:
            raise ValueError(f"no tile in {root / TILE_TABLES_DIR} has a label; tile with annotations or slide labels")
        if skipped:
            logger.warning("%d tiles without a label are left out", len(skipped))
        return IndexResult(frame, skipped, self.name, tuple(sorted(frame["label"].unique())), True)

    def read(self, key: str) -> torch.Tensor:
        base, record = split_key(key)
        if record is None:
            raise ValueError(f"{key} is not a tile key (<table>.parquet#<row>); re-index the tiles")
        return read_tile_row(base, record)

    def classes(
        self, task: str, root: Path | None = None, frame: pd.DataFrame | None = None
    ) -> tuple[tuple[str, ...], str]:
        """The sorted tile labels (of the frame, else of the folder's tables) in ``label``."""
        if frame is None:
            if root is None:
                raise ValueError("tile classes need the tile folder or its index frame")
            frame = self.scan(root).frame
        return tuple(sorted(frame["label"].astype(str).unique())), "label"

    def rebase(self, frame: pd.DataFrame, new_root: Path) -> pd.DataFrame:
        """``<old root>/tiles/<slide>.parquet#n`` -> ``<new root>/tiles/<slide>.parquet#n`` (slides stay where
        the tables say)."""
        return rebase_record_keys(frame, new_root / TILE_TABLES_DIR, "a tile (<table>.parquet#<row>)")


SOURCE: DataSource = TilesSource()
