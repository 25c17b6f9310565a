"""The feature folder's files: per-slide HDF5 in the CLAM/TRIDENT layout, one file for an image set.

``FEATURES/<slide>.h5`` (tile folders), readable by plain h5py:

- ``features``: float32 (N, D), one row per tile of the slide's tile table, in table order;
- ``coords``: int64 (N, 2), the level-0 (x, y) of each tile's top-left corner (the table's ``x``, ``y``);
- ``labels``: N strings, the table's tile labels ("" where unknown);
- attrs ``backbone``, ``weights``, ``preprocessing`` (JSON), ``tile_size_level0``, ``slide``,
  ``patient_id``, and ours: ``feature_key`` (the folder's hash), ``source`` (the tile table's size and
  mtime, so a re-tiled slide is recomputed) and ``tile_table`` (its path; tile ``i`` is key
  ``<tile_table>#i``).

``FEATURES/features.h5`` (image sets: BreakHis, ImageFolder, CIFAR-10): ``features`` (N, D), ``keys``
(the index keys), ``labels``, ``tumor_class``, ``patient_id`` (strings) and ``magnification`` (int).

``FEATURES/manifest.json``: ``feature_key``, ``backbone``, ``weights``, ``dim``, ``preprocessing``, ``data``,
``data_format``, ``kind`` (``slides`` or ``images``), ``slides`` (names), and the ``merge`` comparison.
Every file is written under a temporary name and renamed, so a killed extraction leaves whole files only.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
IMAGE_SET_FILE = "features.h5"
SLIDE_SUFFIX = ".h5"
KIND_SLIDES = "slides"
KIND_IMAGES = "images"


def _h5py():
    try:
        import h5py
    except ImportError as error:  # a dependency; only an old environment lacks it
        raise ValueError("feature files need h5py: `pip install 'h5py>=3.9'` (or reinstall histotoken)") from error
    return h5py


def _strings(values: Sequence[Any]) -> np.ndarray:
    return np.asarray([str(v) for v in values], dtype=object)


def _write_atomic(path: Path, datasets: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> Path:
    """One HDF5 file with ``datasets`` and ``attrs``, written to ``<path>.<pid>.<random>.tmp`` and renamed (grid workers
    that embed the same features at once each write their own temporary file; the last rename wins)."""
    h5py = _h5py()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with h5py.File(tmp, "w") as handle:
        for name, values in datasets.items():
            if values.dtype == object:
                handle.create_dataset(name, data=values, dtype=h5py.string_dtype())
            else:
                handle.create_dataset(name, data=values)
        for name, value in attrs.items():
            handle.attrs[name] = value
    os.replace(tmp, path)
    return path


def write_slide_features(
    path: Path, features: np.ndarray, coords: np.ndarray, labels: Sequence[str], attrs: Mapping[str, Any]
) -> Path:
    """``<slide>.h5``: features float32 (N, D), coords int64 (N, 2), labels (N strings), ``attrs``."""
    features = np.asarray(features, dtype=np.float32)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if len(features) != len(coords) or len(labels) != len(coords):
        raise ValueError(f"{path}: {len(features)} features, {len(coords)} coords and {len(labels)} labels differ")
    return _write_atomic(path, {"features": features, "coords": coords, "labels": _strings(labels)}, attrs)


def write_image_features(path: Path, features: np.ndarray, frame: Any, attrs: Mapping[str, Any]) -> Path:
    """``features.h5`` of an image set, keyed like its index ``frame`` (path, label, tumor_class, patient_id, ...)."""
    datasets = {
        "features": np.asarray(features, dtype=np.float32),
        "keys": _strings(frame["path"]),
        "labels": _strings(frame["label"]),
        "tumor_class": _strings(frame["tumor_class"]),
        "patient_id": _strings(frame["patient_id"]),
        "magnification": np.asarray(frame["magnification"], dtype=np.int64),
    }
    return _write_atomic(path, datasets, attrs)


def read_attrs(path: Path) -> dict[str, Any]:
    """A feature file's attributes (empty when it cannot be opened: a damaged file is recomputed)."""
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as handle:
            return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in handle.attrs.items()}
    except OSError:
        return {}


def read_features(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of a feature file (strings decoded)."""
    h5py = _h5py()
    if not Path(path).is_file():
        raise FileNotFoundError(f"feature file {path} does not exist; run `histotoken embed` first")
    out = {}
    with h5py.File(path, "r") as handle:
        for name, dataset in handle.items():
            values = dataset[()]
            if values.dtype == object:
                values = np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)
            out[name] = values
    return out


def read_manifest(features_dir: Path) -> dict[str, Any]:
    path = Path(features_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{features_dir} has no {MANIFEST}; give a folder written by `histotoken embed`")
    return json.loads(path.read_text())


def write_manifest(features_dir: Path, manifest: Mapping[str, Any]) -> Path:
    from histotoken.io import atomic_write_json

    return atomic_write_json(Path(features_dir) / MANIFEST, dict(manifest))


def keyed_features(features_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(index keys, features (N, D)) of a feature folder: an image set's ``keys``, or ``<tile_table>#<row>``
    for every tile of every slide file."""
    features_dir = Path(features_dir)
    manifest = read_manifest(features_dir)
    if manifest["kind"] == KIND_IMAGES:
        data = read_features(features_dir / IMAGE_SET_FILE)
        return data["keys"], data["features"]
    from histotoken.formats import KEY_SEPARATOR

    keys, blocks = [], []
    for slide in manifest["slides"]:
        path = features_dir / f"{slide}{SLIDE_SUFFIX}"
        table = read_attrs(path).get("tile_table")
        features = read_features(path)["features"]
        keys.extend(f"{table}{KEY_SEPARATOR}{row}" for row in range(len(features)))
        blocks.append(features)
    return np.asarray(keys, dtype=object), np.concatenate(blocks) if blocks else np.zeros((0, manifest["dim"]), np.float32)
