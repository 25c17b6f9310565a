"""Cached image index of a data folder: decode-checking 7,909 PNGs takes a minute, so do it once per tree state.

Sources that decode every image to check it (``DataSource.decodes_images``: BreakHis, ImageFolder)
are cached; CIFAR-10 batches and WSI tile tables are read directly (cheap). See
:mod:`histotoken.data.sources` for the sources and their detection.

The cache lives in ``$HISTOTOKEN_CACHE`` (default ``~/.cache/histotoken``), never in the data
folder (which may be read-only). It is keyed by the source, the folder's absolute path and the
groups file, and reused while the list of image files, their sizes and modification times (and
those of the groups file) are unchanged, and while ``INDEX_VERSION`` (the decoder's rules) is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pandas as pd

from histotoken.data.decode import IMAGE_SUFFIXES
from histotoken.data.sources import DataSource, IndexResult, detect_format, get_source
from histotoken.formats import GROUPS_FILE
from histotoken.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

INDEX_VERSION = 2  # 2: one guarded decoder (data.decode); indexes made by the older checks are redone
UNGROUPED_WARNING = (
    "{root} has no image -> patient/group table ({groups} or --groups CSV): every image is its own group, "
    "so images of one patient may land on both sides of the split and test scores may be optimistic"
)


def cache_dir() -> Path:
    return Path(os.environ.get("HISTOTOKEN_CACHE", Path.home() / ".cache" / "histotoken"))


def _tree_signature(root: Path) -> str:
    digest = hashlib.sha1(f"v{INDEX_VERSION}\n".encode())
    for here, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                stat = os.stat(os.path.join(here, name))
                digest.update(f"{here}/{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_index(
    data_root: str | Path, refresh: bool = False, data_format: str = "auto", groups: str | Path | None = None
) -> IndexResult:
    """The index of a data folder (any registered source), cached where building it decodes images.

    ``data_format`` overrides the detected kind; ``groups`` is an ImageFolder's image -> group CSV
    (default ``ROOT/groups.csv`` when present). Without groups, a warning says once per folder that
    images of one patient may land on both sides of a split.
    """
    kind = detect_format(data_root, data_format)
    source = get_source(kind)
    root = Path(data_root).expanduser().resolve()
    if source.decodes_images:
        result = _cached_scan(source, root, refresh, groups)
    else:
        result = source.scan(root, groups)
    result.data_format = kind
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


def _cached_scan(source: DataSource, root: Path, refresh: bool, groups: str | Path | None) -> IndexResult:
    groups_path = Path(groups).expanduser().resolve() if groups else root / GROUPS_FILE
    extra = ""
    if groups_path.is_file():
        stat = groups_path.stat()
        extra = f"{groups_path}:{stat.st_size}:{stat.st_mtime_ns}"
    key = hashlib.sha1(f"{source.name}:{root}:{groups_path}".encode()).hexdigest()[:16]
    csv_path = cache_dir() / f"index-{key}.csv"
    meta_path = csv_path.with_suffix(".json")
    signature = _tree_signature(root) + extra
    if not refresh and csv_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("signature") == signature:
                frame = pd.read_csv(csv_path, dtype={"patient_id": str, "tumor_class": str, "label": str})
                skipped = [tuple(item) for item in meta.get("skipped", [])]
                names = tuple(meta["class_names"]) if meta.get("class_names") is not None else None
                return IndexResult(frame, skipped, source.name, names, bool(meta.get("grouped", True)))
        except (OSError, ValueError, KeyError) as error:
            logger.warning("index cache %s is unreadable (%s); indexing again", csv_path, error)
    logger.info("indexing %s (decoding every image once; cached afterwards)", root)
    result = source.scan(root, groups_path if groups_path.is_file() else None)
    _write_cache(csv_path, meta_path, result, {
        "root": str(root), "source": source.name, "signature": signature, "skipped": result.skipped,
        "class_names": list(result.class_names) if result.class_names is not None else None,
        "grouped": result.grouped,
    })
    return result


def _write_cache(csv_path: Path, meta_path: Path, result: IndexResult, meta: dict) -> None:
    try:
        atomic_write_text(csv_path, result.frame.to_csv(index=False))
        atomic_write_json(meta_path, meta)
    except OSError as error:  # a read-only home or a full disk is no reason to fail
        logger.warning("could not write the index cache %s: %s", csv_path, error)
