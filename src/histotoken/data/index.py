"""Cached image index of a data folder: decode-checking 7,909 PNGs takes a minute, so do it once per tree state.

BreakHis and ImageFolder trees are decode-checked and cached; CIFAR-10 batches and WSI tile
tables are read directly (cheap). See ``data.sources`` for the non-BreakHis kinds.

The cache lives in ``$HISTOTOKEN_CACHE`` (default ``~/.cache/histotoken``), never in the data
folder (which may be read-only). It is keyed by the folder's absolute path and reused while the
list of image files, their sizes and modification times are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pandas as pd

from histotoken.data.breakhis import IMAGE_SUFFIXES, IndexResult, find_breast_root, scan_breakhis
from histotoken.data.sources import (
    GROUPS_FILE,
    UNGROUPED_WARNING,
    detect_format,
    scan_imagefolder,
    scan_source,
)
from histotoken.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("HISTOTOKEN_CACHE", Path.home() / ".cache" / "histotoken"))


def _tree_signature(breast: Path) -> str:
    digest = hashlib.sha1()
    for root, dirs, files in os.walk(breast):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                stat = os.stat(os.path.join(root, name))
                digest.update(f"{root}/{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_index(
    data_root: str | Path, refresh: bool = False, data_format: str = "auto", groups: str | Path | None = None
) -> IndexResult:
    """The index of a data folder (BreakHis, ImageFolder, CIFAR-10 or tiles), cached where decoding is needed.

    ``data_format`` overrides the detected kind; ``groups`` is an ImageFolder's image -> group CSV
    (default ``ROOT/groups.csv`` when present). Without groups, a warning says once per folder that
    images of one patient may land on both sides of a split.
    """
    kind = detect_format(data_root, data_format)
    if kind == "breakhis":
        return _load_breakhis(data_root, refresh)
    if kind == "imagefolder":
        result = _load_imagefolder(Path(data_root), refresh, groups)
    else:
        base, names, grouped = scan_source(data_root, kind, groups)
        result = IndexResult(base.frame, base.skipped, kind, names, grouped)
    if not result.grouped:
        warn_ungrouped(data_root)
    return result


_WARNED: set[str] = set()


def warn_ungrouped(data_root: str | Path) -> str:
    """Log (once per folder and process) that the data have no patient groups; return the text."""
    text = UNGROUPED_WARNING.format(root=data_root, groups=GROUPS_FILE)
    key = str(Path(data_root).expanduser().resolve())
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(text)
    return text


def _load_imagefolder(root: Path, refresh: bool, groups: str | Path | None) -> IndexResult:
    root = root.expanduser().resolve()
    groups_path = Path(groups).expanduser().resolve() if groups else root / GROUPS_FILE
    extra = ""
    if groups_path.is_file():
        stat = groups_path.stat()
        extra = f"{groups_path}:{stat.st_size}:{stat.st_mtime_ns}"
    key = hashlib.sha1(f"imagefolder:{root}:{groups_path}".encode()).hexdigest()[:16]
    csv_path = cache_dir() / f"index-{key}.csv"
    meta_path = csv_path.with_suffix(".json")
    signature = _tree_signature(root) + extra
    if not refresh and csv_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("signature") == signature:
            frame = pd.read_csv(csv_path, dtype={"patient_id": str, "tumor_class": str, "label": str})
            skipped = [tuple(item) for item in meta.get("skipped", [])]
            return IndexResult(frame, skipped, "imagefolder", tuple(meta["class_names"]), bool(meta["grouped"]))
    logger.info("indexing %s (decoding every image once; cached afterwards)", root)
    base, names, grouped = scan_imagefolder(root, groups_path if groups_path.is_file() else None)
    result = IndexResult(base.frame, base.skipped, "imagefolder", names, grouped)
    _write_cache(csv_path, meta_path, result, {
        "root": str(root), "signature": signature, "skipped": result.skipped,
        "class_names": list(names), "grouped": grouped,
    })
    return result


def _write_cache(csv_path: Path, meta_path: Path, result: IndexResult, meta: dict) -> None:
    try:
        atomic_write_text(csv_path, result.frame.to_csv(index=False))
        atomic_write_json(meta_path, meta)
    except OSError as error:  # a read-only home is no reason to fail
        logger.warning("could not write the index cache %s: %s", csv_path, error)


def _load_breakhis(data_root: str | Path, refresh: bool = False) -> IndexResult:
    """The index of a BreakHis folder, from the cache when the folder has not changed."""
    breast = find_breast_root(data_root).resolve()
    key = hashlib.sha1(str(breast).encode()).hexdigest()[:16]
    csv_path = cache_dir() / f"index-{key}.csv"
    meta_path = csv_path.with_suffix(".json")
    signature = _tree_signature(breast)
    if not refresh and csv_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("signature") == signature:
            frame = pd.read_csv(csv_path, dtype={"patient_id": str})
            return IndexResult(frame, [tuple(item) for item in meta.get("skipped", [])])
    logger.info("indexing %s (decoding every image once; cached afterwards)", breast)
    result = scan_breakhis(breast)
    _write_cache(csv_path, meta_path, result, {"root": str(breast), "signature": signature, "skipped": result.skipped})
    return result
