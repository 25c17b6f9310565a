"""CIFAR-10, binary version (Krizhevsky 2009), as a data source: recognised by its batch files.

``DATA_ROOT`` or ``DATA_ROOT/cifar-10-batches-bin`` holds ``data_batch_1..5.bin``, ``test_batch.bin``
and ``batches.meta.txt``; each record is 1 label byte + 3072 pixel bytes (R, G, B planes of 32x32,
row-major). Keys are ``<file>.bin#<record>``; every record is its own group (images are independent);
``subset`` is ``train`` for data_batch_* and ``test`` for test_batch (splits keep the official test batch).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from histotoken.data.sources import (
    NO_MAGNIFICATION,
    DataSource,
    IndexResult,
    SourceWords,
    rebase_record_keys,
    split_key,
)
from histotoken.formats import CIFAR_DIR, CIFAR_META_FILE, CIFAR_TEST_FILE, CIFAR_TRAIN_FILES, KEY_SEPARATOR

if TYPE_CHECKING:
    import pandas as pd
    import torch

CIFAR_SIDE = 32
CIFAR_RECORD = 1 + 3 * CIFAR_SIDE * CIFAR_SIDE  # 1 label byte + R, G, B planes of 32x32


def cifar_dir(data_root: str | Path, required: bool = True) -> Path | None:
    """The folder that holds CIFAR-10's ``*.bin`` files: DATA_ROOT or DATA_ROOT/cifar-10-batches-bin."""
    root = Path(data_root).expanduser()
    for candidate in (root, root / CIFAR_DIR):
        if candidate.is_dir() and any((candidate / name).is_file() for name in (CIFAR_TRAIN_FILES[0], CIFAR_TEST_FILE)):
            return candidate
    if required:
        raise FileNotFoundError(
            f"{root} holds no CIFAR-10 binary batches ({CIFAR_TRAIN_FILES[0]} ... {CIFAR_TEST_FILE}); get the "
            "'CIFAR-10 binary version' from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it"
        )
    return None


def cifar_class_names(folder: Path) -> tuple[str, ...]:
    meta = folder / CIFAR_META_FILE
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} is missing; it names the 10 classes (one a line) in the CIFAR-10 binary version")
    names = tuple(line.strip() for line in meta.read_text().splitlines() if line.strip())
    if not names:
        raise ValueError(f"{meta} names no classes; restore it from the CIFAR-10 binary archive")
    return names


@functools.lru_cache(maxsize=16)
def _cifar_records(path: str) -> np.ndarray:
    """A batch file as a read-only (records, 3073) uint8 array, memory-mapped."""
    size = Path(path).stat().st_size
    if size == 0 or size % CIFAR_RECORD:
        raise ValueError(
            f"{path} is not a CIFAR-10 binary batch: its size {size} is not a multiple of {CIFAR_RECORD} bytes "
            "(1 label byte + 3072 pixel bytes a record); re-download the binary version"
        )
    return np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, CIFAR_RECORD)


def read_cifar_record(path: str, record: int) -> torch.Tensor:
    """Record ``record`` of a CIFAR-10 batch as a (3, 32, 32) uint8 tensor (R, G, B planes, row-major)."""
    import torch

    records = _cifar_records(path)
    if not 0 <= record < len(records):
        raise ValueError(f"{path} has {len(records)} records; record {record} does not exist. Re-index the data")
    pixels = np.array(records[record, 1:]).reshape(3, CIFAR_SIDE, CIFAR_SIDE)
    return torch.from_numpy(pixels)


class Cifar10Source:
    name = "cifar10"
    words = SourceWords(
        group="image", groups="images", class_word="class", classes_word="classes",
        has_magnification=False, description="CIFAR-10 (binary batches)",
    )
    decodes_images = False
    key_suffix = ".bin"

    def detect(self, root: Path) -> bool:
        return cifar_dir(root, required=False) is not None

    def scan(self, root: Path, groups: str | Path | None = None) -> IndexResult:
        """One row per record of data_batch_1..5 (subset train) and test_batch (subset test)."""
        import pandas as pd

        folder = cifar_dir(root).resolve()
        names = cifar_class_names(folder)
        frames = []
        for name in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE):
            path = folder / name
            if not path.is_file():
                continue
            labels = _cifar_records(str(path))[:, 0]
            if labels.size and int(labels.max()) >= len(names):
                raise ValueError(f"{path} has label {int(labels.max())} but {folder / CIFAR_META_FILE} names {len(names)} classes")
            keys = [f"{path}{KEY_SEPARATOR}{i}" for i in range(len(labels))]
            classes = np.asarray(names, dtype=object)[labels]
            frames.append(pd.DataFrame({
                "path": keys, "patient_id": keys, "tumor_class": classes, "label": classes,
                "magnification": NO_MAGNIFICATION, "width": CIFAR_SIDE, "height": CIFAR_SIDE,
                "subset": "test" if name == CIFAR_TEST_FILE else "train",
            }))
        return IndexResult(pd.concat(frames, ignore_index=True), [], self.name, names, False)

    def read(self, key: str) -> torch.Tensor:
        base, record = split_key(key)
        if record is None:
            raise ValueError(f"{key} is not a CIFAR-10 key (<batch>.bin#<record>); re-index the data")
        try:
            return read_cifar_record(base, record)
        except OSError as error:
            raise ValueError(f"cannot read {key}: {error}") from None

    def classes(
        self, task: str, root: Path | None = None, frame: pd.DataFrame | None = None
    ) -> tuple[tuple[str, ...], str]:
        """The names in batches.meta.txt (label byte order) when the folder is known, else the frame's, sorted."""
        if root is not None:
            return cifar_class_names(cifar_dir(root)), "label"
        if frame is None:
            raise ValueError("CIFAR-10 classes need the data folder or its index frame")
        return tuple(sorted(frame["label"].astype(str).unique())), "label"

    def rebase(self, frame: pd.DataFrame, new_root: Path) -> pd.DataFrame:
        """``<old dir>/<batch>.bin#n`` -> ``<new batches dir>/<batch>.bin#n``."""
        return rebase_record_keys(frame, cifar_dir(new_root).resolve(), "a CIFAR-10 record (<batch>.bin#<n>)")


SOURCE: DataSource = Cifar10Source()
