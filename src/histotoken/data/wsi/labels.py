"""Slide labels and patient ids: the CAMELYON16 reference CSV (slide,label), CAMELYON17 names.

The labels CSV has one row per slide. With a header, the columns ``slide`` (or ``image``, ``case``) and
``label`` (or ``class``, ``stage``) are used, and ``patient_id`` (or ``patient``) when present; without a
header (CAMELYON16's reference.csv: ``test_001,Tumor,Macro,Primary``) the first two columns are slide
and label. Slide names may carry a file suffix. Labels are normalised to ``tumor`` / ``normal``:
CAMELYON17 node stages ``itc``, ``micro``, ``macro`` count as tumour, ``negative`` as normal (its
stage CSV, ``patient,stage``, names slides in the ``patient`` column; its patient rows are skipped).
Patient ids come from the CSV, else from CAMELYON17 names ``patient_XXX_node_Y`` (-> ``patient_XXX``),
else each slide is its own patient.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

TUMOR_LABELS = frozenset({"tumor", "tumour", "1", "positive", "itc", "micro", "macro", "metastasis", "true"})
NORMAL_LABELS = frozenset({"normal", "0", "negative", "false"})
CAMELYON17_NAME = re.compile(r"^(patient_\d+)_node_\d+$", re.IGNORECASE)
SLIDE_COLUMNS = ("slide", "image", "case", "slide_id", "filename")
LABEL_COLUMNS = ("label", "class", "stage", "diagnosis")
PATIENT_COLUMNS = ("patient_id", "patient")


def normalise_label(value: object, path: Path | None = None) -> str:
    text = str(value).strip().lower()
    if text in TUMOR_LABELS:
        return "tumor"
    if text in NORMAL_LABELS:
        return "normal"
    raise ValueError(f"{path or 'labels CSV'}: slide label {value!r} is neither tumour (Tumor, 1, itc, micro, macro) "
                     "nor normal (Normal, 0, negative)")


def _strip_suffix(name: str) -> str:
    name = Path(str(name).strip()).name
    return name.rsplit(".", 1)[0] if re.search(r"\.[A-Za-z]{2,7}$", name) else name


def patient_from_name(slide: str) -> str:
    """``patient_012_node_3`` -> ``patient_012``; any other name is its own patient."""
    match = CAMELYON17_NAME.match(slide)
    return match.group(1) if match else slide


def read_slide_labels(path: str | Path) -> pd.DataFrame:
    """The labels CSV as a frame indexed by slide name with columns ``label`` and ``patient_id``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such labels CSV")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    columns = {c.strip().lower(): c for c in frame.columns}
    slide_column = next((columns[c] for c in SLIDE_COLUMNS if c in columns), None)
    label_column = next((columns[c] for c in LABEL_COLUMNS if c in columns), None)
    if slide_column is None and label_column is not None and "patient" in columns:
        # CAMELYON17 stage CSV: "patient,stage" with slide rows (patient_004_node_4.tif,itc) and patient rows
        # (patient_004.zip,pN1); the slide rows are the slide labels.
        slide_column = columns.pop("patient")
        frame = frame[~frame[slide_column].str.lower().str.endswith(".zip")]
    if slide_column is None or label_column is None:  # no header: CAMELYON16 reference.csv
        frame = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
        if frame.shape[1] < 2:
            raise ValueError(f"{path}: a labels CSV needs two columns, slide and label (e.g. tumor_001,Tumor)")
        slide_column, label_column = frame.columns[0], frame.columns[1]
        columns = {}
    patient_column = next((columns[c] for c in PATIENT_COLUMNS if c in columns), None)
    slides = [_strip_suffix(name) for name in frame[slide_column]]
    result = pd.DataFrame(
        {
            "label": [normalise_label(value, path) for value in frame[label_column]],
            "patient_id": (
                list(frame[patient_column]) if patient_column is not None else [patient_from_name(s) for s in slides]
            ),
        },
        index=pd.Index(slides, name="slide"),
    )
    duplicated = result.index[result.index.duplicated()].unique()
    if len(duplicated):
        raise ValueError(f"{path}: slides listed twice: {list(duplicated)[:5]}")
    return result
