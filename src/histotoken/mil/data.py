"""Bags of tile features from per-slide HDF5 files (the CLAM/TRIDENT layout that ``histotoken embed`` writes).

One file per slide, ``FEATURES/<slide>.h5``: datasets ``features`` (N x D float32) and ``coords``
(N x 2 int64, level-0 x, y), optionally ``labels``; attributes ``slide``, ``patient_id``, ``backbone``.

A bag is read either whole, as a subset of at most ``max_tiles`` rows (sorted indices, so h5py
reads only those rows), or as consecutive chunks of rows (:func:`iter_feature_chunks`), so that a
100,000-tile slide is never in memory at once for the aggregators that stream.

Slide table: the labels CSV (``histotoken.data.wsi.labels.read_slide_labels``: slide, label, optional
patient_id) joined with the feature files. Patient ids: the CSV's ``patient_id``/``patient`` column,
else the file's ``patient_id`` attribute, else the CAMELYON17 name rule (``patient_004_node_1`` ->
``patient_004``), else the slide is its own patient.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from histotoken.data.wsi.labels import PATIENT_COLUMNS, patient_from_name, read_slide_labels

logger = logging.getLogger(__name__)

CLASS_NAMES = ("normal", "tumor")  # label 0, 1


@dataclasses.dataclass(frozen=True)
class SlideBag:
    """One slide's feature file and its label."""

    slide: str
    path: Path
    label: int
    patient_id: str

    def num_tiles(self) -> int:
        with h5py.File(self.path, "r") as handle:
            return int(handle["features"].shape[0])

    def load(self, indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(features (n, D) float32, coords (n, 2)) of the rows ``indices`` (sorted), or of every row."""
        with h5py.File(self.path, "r") as handle:
            features, coords = handle["features"], handle["coords"]
            if indices is None:
                return np.asarray(features[...], dtype=np.float32), np.asarray(coords[...])
            indices = np.asarray(indices, dtype=np.int64)
            return np.asarray(features[indices], dtype=np.float32), np.asarray(coords[indices])

    def coords(self) -> np.ndarray:
        with h5py.File(self.path, "r") as handle:
            return np.asarray(handle["coords"][...])


def subset_indices(num_tiles: int, max_tiles: int | None, rng: np.random.Generator | None) -> np.ndarray | None:
    """Sorted row indices of at most ``max_tiles`` tiles: random with ``rng``, else evenly spaced; None = all."""
    if max_tiles is None or num_tiles <= max_tiles:
        return None
    if rng is not None:
        return np.sort(rng.choice(num_tiles, size=max_tiles, replace=False))
    return np.unique(np.linspace(0, num_tiles - 1, max_tiles).round().astype(np.int64))


def iter_feature_chunks(path: str | Path, chunk_size: int) -> Iterator[np.ndarray]:
    """Consecutive (<= chunk_size, D) float32 blocks of a feature file's rows, one read at a time."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    with h5py.File(path, "r") as handle:
        features = handle["features"]
        for start in range(0, features.shape[0], chunk_size):
            yield np.asarray(features[start : start + chunk_size], dtype=np.float32)


def read_attrs(path: Path) -> dict[str, str]:
    with h5py.File(path, "r") as handle:
        if "features" not in handle or "coords" not in handle:
            raise ValueError(f"{path}: a feature file needs datasets 'features' and 'coords' (write it with histotoken embed)")
        attrs = {}
        for key in ("slide", "patient_id", "backbone"):
            value = handle.attrs.get(key)
            if value is not None:
                attrs[key] = value.decode() if isinstance(value, bytes) else str(value)
        attrs["feature_dim"] = str(handle["features"].shape[1])
        return attrs


def feature_files(features_dir: str | Path) -> dict[str, Path]:
    """Slide name -> its ``<slide>.h5`` file in ``features_dir``."""
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise FileNotFoundError(f"{features_dir}: no such features folder (write one with `histotoken embed ... --out`)")
    files = {path.stem: path for path in sorted(features_dir.glob("*.h5"))}
    if not files:
        raise FileNotFoundError(f"{features_dir}: no <slide>.h5 feature files in it (write them with `histotoken embed`)")
    return files


def _csv_has_patient_column(labels_csv: Path) -> bool:
    header = pd.read_csv(labels_csv, nrows=0)
    return any(str(column).strip().lower() in PATIENT_COLUMNS for column in header.columns)


def slide_bags(features_dir: str | Path, labels_csv: str | Path) -> list[SlideBag]:
    """The labelled slides that have a feature file, in slide-name order."""
    files = feature_files(features_dir)
    labels = read_slide_labels(labels_csv)
    from_csv = _csv_has_patient_column(Path(labels_csv))
    missing = [slide for slide in labels.index if slide not in files]
    if missing:
        raise FileNotFoundError(f"{features_dir}: no feature file for {len(missing)} labelled slide(s), e.g. "
                                f"{missing[0]}.h5; embed them or drop them from {labels_csv}")
    unlabelled = sorted(set(files) - set(labels.index))
    if unlabelled:
        logger.info("%d feature file(s) have no label in %s and are left out (e.g. %s)",
                    len(unlabelled), labels_csv, unlabelled[0])
    bags = []
    for slide in sorted(labels.index):
        attrs = read_attrs(files[slide])
        if from_csv:
            patient = str(labels.loc[slide, "patient_id"])
        else:
            patient = attrs.get("patient_id") or patient_from_name(slide)
        bags.append(SlideBag(slide, files[slide], CLASS_NAMES.index(labels.loc[slide, "label"]), patient))
    return bags
