"""Cached BreakHis index: decode-checking 7,909 PNGs takes a minute, so do it once per tree state.

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


def load_index(data_root: str | Path, refresh: bool = False) -> IndexResult:
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
    try:
        atomic_write_text(csv_path, result.frame.to_csv(index=False))
        atomic_write_json(meta_path, {"root": str(breast), "signature": signature, "skipped": result.skipped})
    except OSError as error:  # a read-only home is no reason to fail
        logger.warning("could not write the index cache %s: %s", csv_path, error)
    return result
