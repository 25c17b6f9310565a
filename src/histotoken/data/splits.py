"""Patient-disjoint, subtype-stratified train/val/test splits (and the leaky image-level option).

BreakHis has 82 patients and 7,909 images: a random image-level split puts images of the same
patient (often near-duplicate fields of view) on both sides and inflates test scores. The default
here assigns whole patients to one side, across all magnifications, so a test patient's images at
every magnification are test images. One patient id (14-13412) appears under two subtypes in
BreakHis: grouping by patient id keeps all its images on one side.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

logger = logging.getLogger(__name__)

SPLIT_COLUMNS = ["path", "patient_id", "tumor_class", "label", "magnification", "split"]
# Written only by image-level splits (value "image" in every row): the record that lets a split keep
# one patient on two sides. A file without it must be patient-disjoint (read_split checks).
SCHEME_COLUMN = "scheme"
IMAGE_SCHEME = "image"
IMAGE_SCHEME_WARNING = (
    "image-level split: images of the same patient land in train and test, so test scores are "
    "optimistic. Use it only to reproduce published protocols that split this way."
)


def make_split(
    index: pd.DataFrame,
    scheme: str = "patient",
    val: float = 0.15,
    test: float = 0.15,
    folds: int | None = None,
    fold: int = 0,
    seed: int = 0,
) -> pd.DataFrame:
    """Return the index with a ``split`` column (train/val/test).

    ``scheme="patient"``: whole patients go to one side, stratified by (majority) subtype; each
    subtype with at least three patients gets at least one in val and one in test. With ``folds=K``
    the test patients are fold ``fold`` of scikit-learn's StratifiedGroupKFold and val is carved
    from the remaining patients. ``scheme="image"`` splits images at random (leaks patients; warns).
    """
    if not 0 <= val < 1 or not 0 <= test < 1 or val + test >= 1:
        raise ValueError(f"val ({val}) and test ({test}) must be fractions in [0, 1) that sum below 1")
    frame = index.copy()
    if "subset" in frame.columns and folds is None and (frame["subset"] == "test").any():
        return _official_test_split(frame, scheme, val, seed)
    if scheme == "image":
        logger.warning(IMAGE_SCHEME_WARNING)
        frame["split"] = _image_split(frame, val, test, seed)
    elif scheme == "patient":
        if folds is not None:
            if folds < 2 or not 0 <= fold < folds:
                raise ValueError(f"--folds must be >= 2 and --fold in [0, {folds - 1}]; got folds={folds}, fold={fold}")
            test_patients = _fold_test_patients(frame, folds, fold, seed)
            rest = _patient_table(frame[~frame["patient_id"].isin(test_patients)])
            val_patients, _ = _allocate(rest, val / (1 - 1 / folds), 0.0, seed)
        else:
            val_patients, test_patients = _allocate(_patient_table(frame), val, test, seed)
        frame["split"] = "train"
        frame.loc[frame["patient_id"].isin(val_patients), "split"] = "val"
        frame.loc[frame["patient_id"].isin(test_patients), "split"] = "test"
    else:
        raise ValueError(f"unknown split scheme {scheme!r}; choose 'patient' (default) or 'image'")
    return _finish(frame, scheme)


def _finish(frame: pd.DataFrame, scheme: str) -> pd.DataFrame:
    """The split's columns (plus the scheme record of an image-level split); warns about empty sides."""
    columns = SPLIT_COLUMNS
    if scheme == IMAGE_SCHEME:
        frame[SCHEME_COLUMN] = IMAGE_SCHEME
        columns = [*SPLIT_COLUMNS, SCHEME_COLUMN]
    split = frame[columns].reset_index(drop=True)
    for warning in empty_side_warnings(split):
        logger.warning(warning)
    return split


def empty_side_warnings(split: pd.DataFrame) -> list[str]:
    """One sentence per class that has no validation or no test patients (its numbers there are missing)."""
    patients = split.groupby(["tumor_class", "split"])["patient_id"].nunique().unstack(fill_value=0)
    warnings = []
    for side, role in (("val", "validation"), ("test", "test")):
        counts = patients[side] if side in patients.columns else pd.Series(0, index=patients.index)
        empty = sorted(str(name) for name in counts[counts == 0].index)
        if empty:
            warnings.append(
                f"class(es) {', '.join(empty)} got no {role} patients: {role} metrics cannot cover them "
                f"(too few patients of that class; give more data, or a larger --{side} fraction)"
            )
    return warnings


def _official_test_split(frame: pd.DataFrame, scheme: str, val: float, seed: int) -> pd.DataFrame:
    """Keep a data set's official test set (CIFAR-10's test_batch) as test; carve val from the rest by group."""
    if scheme == "image":
        logger.warning(IMAGE_SCHEME_WARNING)
    frame["split"] = np.where(frame["subset"] == "test", "test", "train")
    rest = frame[frame["split"] == "train"]
    if scheme == "image":
        if val > 0:
            _, val_rows = train_test_split(rest.index, test_size=val, random_state=seed, stratify=rest["tumor_class"])
            frame.loc[val_rows, "split"] = "val"
    else:
        val_patients, _ = _allocate(_patient_table(rest), val, 0.0, seed)
        frame.loc[rest.index[rest["patient_id"].isin(val_patients)], "split"] = "val"
    return _finish(frame, scheme)


def _patient_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per patient with its majority subtype (a patient under two subtypes gets one stratum)."""
    if frame["patient_id"].is_unique:  # every image its own group (e.g. CIFAR-10): no majority to find
        majority = frame.set_index("patient_id")["tumor_class"].rename_axis("patient_id")
        return majority.rename("stratum").reset_index().sort_values("patient_id").reset_index(drop=True)
    majority = frame.groupby("patient_id")["tumor_class"].agg(lambda s: s.value_counts().index[0])
    return majority.rename("stratum").reset_index().sort_values("patient_id").reset_index(drop=True)


def _allocate(patients: pd.DataFrame, val: float, test: float, seed: int) -> tuple[set[str], set[str]]:
    """Per stratum, shuffle patients and take round(n*test) for test and round(n*val) for val."""
    rng = np.random.default_rng(seed)
    val_ids: set[str] = set()
    test_ids: set[str] = set()
    for _, group in patients.groupby("stratum", sort=True):
        ids = group["patient_id"].to_numpy()
        ids = ids[rng.permutation(len(ids))]
        n = len(ids)
        n_test = _share(n, test, available=n, keep=2)  # leave one patient for val and one for train
        n_val = _share(n, val, available=n - n_test, keep=1)
        test_ids.update(ids[:n_test])
        val_ids.update(ids[n_test : n_test + n_val])
    return val_ids, test_ids


def _share(n: int, fraction: float, available: int, keep: int) -> int:
    """Patients of an n-patient stratum for one side: round(n*fraction), at least one when n >= 3."""
    if fraction <= 0:
        return 0
    count = int(math.floor(n * fraction + 0.5))
    if n >= 3:
        count = max(count, 1)
    return max(0, min(count, available - keep))


def _fold_test_patients(frame: pd.DataFrame, folds: int, fold: int, seed: int) -> set[str]:
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    patients = _patient_table(frame)
    if len(patients) < folds:
        raise ValueError(f"{len(patients)} patients cannot make {folds} folds; use fewer --folds")
    for index, (_, test_rows) in enumerate(
        splitter.split(patients, patients["stratum"], groups=patients["patient_id"])
    ):
        if index == fold:
            return set(patients.loc[test_rows, "patient_id"])
    raise AssertionError("unreachable: fold index checked above")


def _image_split(frame: pd.DataFrame, val: float, test: float, seed: int) -> np.ndarray:
    labels = np.full(len(frame), "train", dtype=object)
    positions = np.arange(len(frame))
    strata = frame["tumor_class"].to_numpy()
    rest, test_pos = train_test_split(positions, test_size=test, random_state=seed, stratify=strata)
    labels[test_pos] = "test"
    if val > 0:
        _, val_pos = train_test_split(
            rest, test_size=val / (1 - test), random_state=seed, stratify=strata[rest]
        )
        labels[val_pos] = "val"
    return labels


def check_patient_disjoint(split: pd.DataFrame, source: str | Path | None = None) -> None:
    """Raise ValueError (one line, naming ``source`` and the patients) when a patient has images on
    more than one side."""
    sides = split.groupby("patient_id")["split"].nunique()
    leaked = sides[sides > 1].index.tolist()
    if leaked:
        where = f"splits file {source}" if source is not None else "the split"
        shown = ", ".join(repr(str(patient)) for patient in leaked[:5])
        more = f" and {len(leaked) - 5} more" if len(leaked) > 5 else ""
        raise ValueError(
            f"{where} puts patient(s) {shown}{more} on more than one side (train/val/test), which leaks them "
            f"into the test scores; regenerate it with `histotoken split`, or, to reproduce an image-level "
            f"protocol on purpose, record it with a column {SCHEME_COLUMN}={IMAGE_SCHEME} "
            f"(`histotoken split --scheme image` writes it)"
        )


def split_summary(split: pd.DataFrame) -> pd.DataFrame:
    """Patients and images per side and subtype."""
    images = split.pivot_table(index="tumor_class", columns="split", values="path", aggfunc="count", fill_value=0)
    patients = split.groupby(["tumor_class", "split"])["patient_id"].nunique().unstack(fill_value=0)
    return images.add_suffix(" images").join(patients.add_suffix(" patients"))


def write_split(split: pd.DataFrame, path: Path) -> Path:
    from histotoken.io import atomic_write_text

    columns = [*SPLIT_COLUMNS, SCHEME_COLUMN] if SCHEME_COLUMN in split.columns else SPLIT_COLUMNS
    return atomic_write_text(path, split[columns].to_csv(index=False))


def read_split(path: str | Path, image_scheme: bool = False) -> pd.DataFrame:
    """Read a splits CSV and check its columns and that no patient is on two sides (unless the file
    records the image scheme, or ``image_scheme``: the caller's record, e.g. a run's config, says it is
    an image-level split); a clear error names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"splits file {path} does not exist; make one with `histotoken split`")
    text = {"path": str, "patient_id": str, "tumor_class": str, "label": str, "split": str}
    frame = pd.read_csv(path, dtype=text, keep_default_na=False, na_values=[""])  # patient "NA" stays "NA"
    missing = [c for c in SPLIT_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"splits file {path} lacks columns {missing}; make it with `histotoken split`")
    bad = set(frame["split"]) - {"train", "val", "test"}
    if bad:
        raise ValueError(f"splits file {path} has unknown split names {sorted(bad)} (expected train/val/test)")
    if not (is_image_scheme(frame, path) or image_scheme):
        check_patient_disjoint(frame, path)
    return frame


def is_image_scheme(split: pd.DataFrame, source: str | Path = "the split") -> bool:
    """Whether a split records the image scheme (column ``scheme`` = ``image`` in every row)."""
    if SCHEME_COLUMN not in split.columns:
        return False
    schemes = set(split[SCHEME_COLUMN].astype(str))
    if schemes - {IMAGE_SCHEME, "patient"} or len(schemes) > 1:
        raise ValueError(f"splits file {source} has scheme values {sorted(schemes)}; expected one value, "
                         f"'{IMAGE_SCHEME}' or 'patient'")
    return schemes == {IMAGE_SCHEME}
