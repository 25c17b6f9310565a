"""Data sources beyond BreakHis: ImageFolder trees, CIFAR-10 (binary version) and WSI tile folders.

Every source yields the same index frame as BreakHis (``breakhis.INDEX_COLUMNS``), so splits,
stores and the engine do not care where an image came from:

- ``path``: a unique string key. A file path for BreakHis and ImageFolder images;
  ``<file>.bin#<record>`` for a CIFAR-10 record; ``<tiles_dir>/tiles/<slide>.parquet#<row>`` for
  a WSI tile. ``read_image(key)`` decodes any of them (see ``dataset.load_image``).
- ``patient_id``: the group that must stay on one side of a split. BreakHis: the patient id in
  the file name; ImageFolder: from a groups CSV when there is one, else the image's own key;
  CIFAR-10: the record's key (images are independent); tiles: the table's ``patient_id``.
- ``tumor_class`` and ``label``: both hold the class name for non-BreakHis sources.
- ``magnification``: 40/100/200/400 for BreakHis, 0 ("none") elsewhere; domains other than
  ``all`` need magnifications (``domains.select_domain`` says so).
- ``subset`` (CIFAR-10 only): ``train`` for data_batch_*, ``test`` for test_batch; splits keep the
  official test batch as the test side.

Detection (``detect_format``): ``summary.csv`` + ``tiles/`` -> tiles; ``data_batch_1.bin`` or
``test_batch.bin`` (in the folder or its ``cifar-10-batches-bin``) -> cifar10; a BreakHis layout ->
breakhis; class folders holding images -> imagefolder.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from histotoken.data.breakhis import IMAGE_SUFFIXES, INDEX_COLUMNS, IndexResult, find_breast_root, probe_image
from histotoken.formats import (
    CIFAR_DIR,
    CIFAR_META_FILE,
    CIFAR_TEST_FILE,
    CIFAR_TRAIN_FILES,
    GROUP_COLUMNS,
    GROUPS_FILE,
    KEY_SEPARATOR,
)
from histotoken.formats import TILE_SUMMARY as TILES_SUMMARY
from histotoken.formats import TILE_TABLES_DIR as TILES_DIR

logger = logging.getLogger(__name__)

FORMATS = ("breakhis", "imagefolder", "cifar10", "tiles")
CIFAR_SIDE = 32
CIFAR_RECORD = 1 + 3 * CIFAR_SIDE * CIFAR_SIDE  # 1 label byte + R, G, B planes of 32x32
UNGROUPED_WARNING = (
    "{root} has no image -> patient/group table ({groups} or --groups CSV): every image is its own group, "
    "so images of one patient may land on both sides of the split and test scores may be optimistic"
)
NO_MAGNIFICATION = 0


def detect_format(data_root: str | Path, data_format: str = "auto") -> str:
    """The kind of data folder: ``breakhis``, ``imagefolder``, ``cifar10`` or ``tiles``."""
    if data_format != "auto":
        if data_format not in FORMATS:
            raise ValueError(f"unknown data format {data_format!r}; choose auto or one of {', '.join(FORMATS)}")
        return data_format
    root = Path(data_root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist; give a BreakHis, ImageFolder, CIFAR-10 or tiles folder")
    if root.is_dir() and (root / TILES_SUMMARY).is_file() and (root / TILES_DIR).is_dir():
        return "tiles"
    if cifar_dir(root, required=False) is not None:
        return "cifar10"
    try:
        find_breast_root(root)
        return "breakhis"
    except FileNotFoundError:
        pass
    if root.is_dir() and any(_image_files_in(folder) for folder in _class_folders(root)):
        return "imagefolder"
    raise FileNotFoundError(
        f"{root} does not look like BreakHis (BreaKHis_v1/... below it), an ImageFolder tree "
        f"(one folder per class), CIFAR-10's {CIFAR_DIR} (data_batch_1.bin ...) or WSI tiles ({TILES_SUMMARY} + "
        f"{TILES_DIR}/). Check the path, or name the kind with --data-format"
    )


def scan_source(
    data_root: str | Path, data_format: str = "auto", groups: str | Path | None = None
) -> tuple[IndexResult, tuple[str, ...] | None, bool]:
    """Index a non-BreakHis source: (index, class names in label order, grouped by patient?)."""
    kind = detect_format(data_root, data_format)
    if kind == "imagefolder":
        return scan_imagefolder(data_root, groups)
    if kind == "cifar10":
        result, names = scan_cifar10(data_root)
        return result, names, False
    if kind == "tiles":
        result, names = scan_tiles(data_root)
        return result, names, True
    raise ValueError(f"scan_source does not index {kind!r} folders; use data.index.load_index")


# --------------------------------------------------------------------------- ImageFolder


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_groups(path: str | Path) -> dict[str, str]:
    """``image,group`` CSV -> {image: group}; image is a path relative to the root or a file name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"groups file {path} does not exist; give a CSV with columns image,group")
    table = pd.read_csv(path, dtype=str)
    missing = [c for c in GROUP_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"groups file {path} lacks columns {missing}; write a CSV with a header 'image,group'")
    return dict(zip(table["image"].str.strip(), table["group"].str.strip()))


def scan_imagefolder(
    data_root: str | Path, groups: str | Path | None = None, check_images: bool = True
) -> tuple[IndexResult, tuple[str, ...], bool]:
    """One row per image of ``ROOT/<class>/**/<image>``; classes are the folder names, sorted."""
    root = Path(data_root).expanduser().resolve()
    groups_path = Path(groups) if groups else (root / GROUPS_FILE if (root / GROUPS_FILE).is_file() else None)
    group_of = read_groups(groups_path) if groups_path else {}
    rows, skipped, names, ungrouped = [], [], [], []
    for folder in _class_folders(root):
        files = _image_files_in(folder)
        if not files:
            continue
        names.append(folder.name)
        for path in files:
            relative = path.relative_to(root).as_posix()
            width = height = 0
            if check_images:
                try:
                    width, height = probe_image(path)
                except ValueError as error:
                    skipped.append((str(path), str(error)))
                    continue
            group = group_of.get(relative, group_of.get(path.name))
            if group_of and group is None:
                ungrouped.append(relative)
            rows.append({
                "path": str(path), "patient_id": group if group is not None else relative,
                "tumor_class": folder.name, "label": folder.name, "magnification": NO_MAGNIFICATION,
                "width": width, "height": height,
            })
    if not rows:
        raise ValueError(f"no readable images in class folders below {root}; expected ROOT/<class>/<image>.png")
    if ungrouped:
        raise ValueError(
            f"groups file {groups_path} names no group for {len(ungrouped)} images (e.g. {ungrouped[0]}); "
            "add a row 'image,group' for each image (relative path or file name)"
        )
    for path, reason in skipped:
        logger.warning("left out %s: %s", path, reason)
    return IndexResult(pd.DataFrame(rows, columns=INDEX_COLUMNS), skipped), tuple(names), bool(group_of)


# --------------------------------------------------------------------------- CIFAR-10 binary


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


def scan_cifar10(data_root: str | Path) -> tuple[IndexResult, tuple[str, ...]]:
    """One row per record of data_batch_1..5 (subset train) and test_batch (subset test)."""
    folder = cifar_dir(data_root).resolve()
    names = cifar_class_names(folder)
    frames = []
    for name in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE):
        path = folder / name
        if not path.is_file():
            continue
        labels = _cifar_records(str(path))[:, 0]
        if labels.size and int(labels.max()) >= len(names):
            raise ValueError(f"{path} has label {int(labels.max())} but {folder / CIFAR_META_FILE} names {len(names)} classes")
        keys = [f"{path}#{i}" for i in range(len(labels))]
        classes = np.asarray(names, dtype=object)[labels]
        frames.append(pd.DataFrame({
            "path": keys, "patient_id": keys, "tumor_class": classes, "label": classes,
            "magnification": NO_MAGNIFICATION, "width": CIFAR_SIDE, "height": CIFAR_SIDE,
            "subset": "test" if name == CIFAR_TEST_FILE else "train",
        }))
    frame = pd.concat(frames, ignore_index=True)
    return IndexResult(frame, []), names


def read_cifar_record(path: str, record: int) -> torch.Tensor:
    """Record ``record`` of a CIFAR-10 batch as a (3, 32, 32) uint8 tensor (R, G, B planes, row-major)."""
    records = _cifar_records(path)
    if not 0 <= record < len(records):
        raise ValueError(f"{path} has {len(records)} records; record {record} does not exist. Re-index the data")
    pixels = np.array(records[record, 1:]).reshape(3, CIFAR_SIDE, CIFAR_SIDE)
    return torch.from_numpy(pixels)


# --------------------------------------------------------------------------- WSI tiles


def scan_tiles(data_root: str | Path) -> tuple[IndexResult, tuple[str, ...]]:
    """One row per tile of ``TILES_DIR/tiles/<slide>.parquet``; classes are the sorted tile labels."""
    root = Path(data_root).expanduser().resolve()
    frames, skipped = [], []
    for parquet in sorted((root / TILES_DIR).glob("*.parquet")):
        table = pd.read_parquet(parquet)
        missing = [c for c in ("label", "patient_id") if c not in table.columns]
        if missing:
            raise ValueError(f"tile table {parquet} lacks columns {missing}; re-run the tiling with labels")
        labels = table["label"].fillna("").astype(str)
        keys = pd.Series([f"{parquet}#{i}" for i in range(len(table))])
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
        raise ValueError(f"{root / TILES_DIR} holds no <slide>.parquet tile tables; tile the slides first")
    frame = pd.concat(frames, ignore_index=True)
    if frame.empty:
        raise ValueError(f"no tile in {root / TILES_DIR} has a label; tile with annotations or slide labels")
    if skipped:
        logger.warning("%d tiles without a label are left out", len(skipped))
    return IndexResult(frame, skipped), tuple(sorted(frame["label"].unique()))


@functools.lru_cache(maxsize=64)
def _tile_table(path: str) -> pd.DataFrame:
    return pd.read_parquet(path)


def read_tile_row(path: str, row: int) -> torch.Tensor:
    """Tile ``row`` of a tile table as a (3, H, W) uint8 tensor, read from its slide."""
    from histotoken.data import wsi  # owned by the slide reader; imported only when tiles are read

    table = _tile_table(path)
    if not 0 <= row < len(table):
        raise ValueError(f"{path} has {len(table)} tiles; tile {row} does not exist. Re-index the tiles")
    return wsi.read_tile(table.iloc[row])


# --------------------------------------------------------------------------- reading any key


def split_key(key: str) -> tuple[str, int | None]:
    """``file.bin#17`` -> (``file.bin``, 17); a plain path -> (path, None)."""
    base, sep, number = key.rpartition(KEY_SEPARATOR)
    if sep and number.isdigit() and Path(base).suffix in (".bin", ".parquet"):
        return base, int(number)
    return key, None


def read_image(key: str) -> torch.Tensor:
    """Decode the image behind an index key to a (C, H, W) uint8 tensor at its stored size.

    Raises ValueError naming the key when it cannot be read.
    """
    base, record = split_key(key)
    if record is None:
        from torchvision.io import ImageReadMode, decode_image

        try:
            image = decode_image(key, mode=ImageReadMode.UNCHANGED)
            if image.shape[0] != 3:
                kind = {1: "grayscale", 2: "grayscale+alpha", 4: "RGBA"}.get(image.shape[0], f"{image.shape[0]}-channel")
                logger.warning("%s is a %s image; converted to RGB", key, kind)
                image = decode_image(key, mode=ImageReadMode.RGB)
        except (RuntimeError, OSError, ValueError) as error:
            raise ValueError(f"cannot decode image {key}: {error}. Re-export or remove the file, then re-index") from error
        return image
    try:
        if base.endswith(".bin"):
            return read_cifar_record(base, record)
        return read_tile_row(base, record)
    except (OSError, RuntimeError) as error:
        raise ValueError(f"cannot read {key}: {error}") from error


# --------------------------------------------------------------------------- classes of a task


def looks_like_breakhis(frame: pd.DataFrame) -> bool:
    """Rows with BreakHis magnifications (non-BreakHis sources have magnification 0)."""
    from histotoken.data.breakhis import MAGNIFICATIONS

    return bool(len(frame)) and bool(frame["magnification"].isin(MAGNIFICATIONS).all())


def task_classes(
    task: str, data: str | Path | None = None, data_format: str = "auto", frame: pd.DataFrame | None = None
) -> tuple[tuple[str, ...], str]:
    """(class names in label order, index column holding them) for ``task`` on some data.

    BreakHis: ``binary`` -> (benign, malignant) in ``label``; ``subtype`` (and ``classes``) -> the
    8 subtypes in ``tumor_class``. Other sources: the data's own classes in ``label`` whatever the
    task: CIFAR-10's names from batches.meta.txt (label byte order), otherwise the sorted class
    names of ``frame`` (ImageFolder folder names, tile labels). The kind comes from ``data`` when
    given (``data_format`` overrides detection), else from ``frame``.
    """
    from histotoken.data.breakhis import class_names

    if data:
        kind = detect_format(data, data_format)
    elif data_format != "auto":
        kind = data_format
    elif frame is not None:
        kind = "breakhis" if looks_like_breakhis(frame) else "imagefolder"
    else:
        raise ValueError("task_classes needs the data folder or its index/split frame")
    if kind == "breakhis":
        if task == "binary":
            return class_names("binary"), "label"
        return class_names("subtype"), "tumor_class"
    if kind == "cifar10" and data:
        return cifar_class_names(cifar_dir(data)), "label"
    if frame is None:
        from histotoken.data.index import load_index

        index = load_index(data, data_format=data_format)
        return tuple(index.class_names or sorted(index.frame["label"].unique())), "label"
    return tuple(sorted(frame["label"].astype(str).unique())), "label"
