"""The BreakHis layout: file-name grammar, class names, paths (the data source is ``data.sources.breakhis``).

BreakHis (Spanhol et al., IEEE TBME 2016) stores images as::

    BreaKHis_v1/histology_slides/breast/<benign|malignant>/SOB/<subtype>/
        SOB_<B|M>_<TT>_<YY>-<ID>/<40X|100X|200X|400X>/SOB_<B|M>_<TT>-<YY>-<ID>-<MAG>-<SEQ>.png

The patient id is ``<YY>-<ID>`` (e.g. ``14-22549AB``). Everything downstream reads the
index (one row per image, built by ``data.sources.breakhis.scan_breakhis``), never the folder tree.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import pandas as pd

from histotoken.data.decode import IMAGE_SUFFIXES  # noqa: F401 - re-exported for older imports

logger = logging.getLogger(__name__)

MAGNIFICATIONS: tuple[int, ...] = (40, 100, 200, 400)
BENIGN_SUBTYPES: tuple[str, ...] = ("adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma")
MALIGNANT_SUBTYPES: tuple[str, ...] = (
    "ductal_carcinoma",
    "lobular_carcinoma",
    "mucinous_carcinoma",
    "papillary_carcinoma",
)
SUBTYPES: tuple[str, ...] = BENIGN_SUBTYPES + MALIGNANT_SUBTYPES
BINARY_CLASSES: tuple[str, ...] = ("benign", "malignant")
# Two-letter codes used in BreakHis file names.
SUBTYPE_CODES: dict[str, str] = {
    "A": "adenosis",
    "F": "fibroadenoma",
    "PT": "phyllodes_tumor",
    "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma",
    "LC": "lobular_carcinoma",
    "MC": "mucinous_carcinoma",
    "PC": "papillary_carcinoma",
}
CODE_OF_SUBTYPE: dict[str, str] = {name: code for code, name in SUBTYPE_CODES.items()}
SYNTHETIC_MARKER = "histotoken_synthetic.json"

# SOB_M_DC-14-2523-400-013.png  ->  B/M, subtype code, patient id, magnification, sequence
_FILE_NAME = re.compile(
    r"^SOB_(?P<kind>[BM])_(?P<code>[A-Z]{1,2})-(?P<patient>\d{2}-[0-9A-Za-z]+)-(?P<mag>\d{2,3})-(?P<seq>\d+)$"
)


def label_of_subtype(tumor_class: str) -> str:
    return "benign" if tumor_class in BENIGN_SUBTYPES else "malignant"


def class_names(task: str) -> tuple[str, ...]:
    """Class order for a task: ``binary`` (benign, malignant) or ``subtype`` (8 BreakHis subtypes)."""
    if task == "binary":
        return BINARY_CLASSES
    if task == "subtype":
        return SUBTYPES
    raise ValueError(f"unknown task {task!r}; choose 'binary' (benign/malignant) or 'subtype' (8 classes)")


def breakhis_file_name(tumor_class: str, patient_id: str, magnification: int, seq: int) -> str:
    """The BreakHis file name for one image, e.g. ``SOB_B_A-14-22549AB-100-001.png``."""
    kind = "B" if tumor_class in BENIGN_SUBTYPES else "M"
    return f"SOB_{kind}_{CODE_OF_SUBTYPE[tumor_class]}-{patient_id}-{magnification}-{seq:03d}.png"


def breakhis_image_path(root: Path, tumor_class: str, patient_id: str, magnification: int, seq: int) -> Path:
    """Where BreakHis keeps that image below ``root`` (the folder that holds ``BreaKHis_v1``)."""
    label = label_of_subtype(tumor_class)
    kind = "B" if label == "benign" else "M"
    patient_folder = f"SOB_{kind}_{CODE_OF_SUBTYPE[tumor_class]}_{patient_id}"
    return (
        root / "BreaKHis_v1" / "histology_slides" / "breast" / label / "SOB" / tumor_class
        / patient_folder / f"{magnification}X" / breakhis_file_name(tumor_class, patient_id, magnification, seq)
    )


@dataclasses.dataclass(frozen=True)
class ParsedName:
    patient_id: str
    tumor_class: str
    label: str
    magnification: int


def parse_file_name(path: str | Path) -> ParsedName:
    """Read patient, subtype, label and magnification from a BreakHis file name.

    Raises ValueError with the reason when the name does not follow the BreakHis pattern.
    """
    stem = Path(path).stem
    match = _FILE_NAME.match(stem)
    if not match:
        raise ValueError(
            "file name does not follow the BreakHis pattern SOB_<B|M>_<TT>-<YY>-<ID>-<MAG>-<SEQ>.png"
        )
    code = match["code"]
    if code not in SUBTYPE_CODES:
        raise ValueError(f"unknown subtype code {code!r} (known: {', '.join(SUBTYPE_CODES)})")
    tumor_class = SUBTYPE_CODES[code]
    label = label_of_subtype(tumor_class)
    if (match["kind"] == "B") != (label == "benign"):
        raise ValueError(f"B/M letter {match['kind']!r} contradicts subtype code {code!r}")
    magnification = int(match["mag"])
    if magnification not in MAGNIFICATIONS:
        raise ValueError(f"magnification {magnification} is not one of {MAGNIFICATIONS}")
    return ParsedName(match["patient"], tumor_class, label, magnification)


def find_breast_root(data_root: str | Path) -> Path:
    """Resolve DATA_ROOT to the ``breast`` folder.

    DATA_ROOT may be the folder that holds ``BreaKHis_v1``, ``BreaKHis_v1`` itself, or any
    folder below it down to ``breast``.
    """
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist; give the folder that holds BreaKHis_v1")
    for candidate in (
        root / "BreaKHis_v1" / "histology_slides" / "breast",
        root / "histology_slides" / "breast",
        root / "breast",
        root,
    ):
        if (candidate / "benign").is_dir() or (candidate / "malignant").is_dir():
            return candidate
    raise FileNotFoundError(
        f"{root} does not look like BreakHis: no benign/ or malignant/ folder found at "
        "BreaKHis_v1/histology_slides/breast below it. Give the folder that holds BreaKHis_v1 "
        "(or make a synthetic copy with `histotoken synth DIR`)."
    )


def is_synthetic(data_root: str | Path) -> bool:
    """True for a folder written by ``histotoken synth`` (it carries a marker file at its top)."""
    root = Path(data_root).expanduser().resolve()
    return any((folder / SYNTHETIC_MARKER).is_file() for folder in (root, *root.parents))


def counts_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Images per tumour class x magnification, with patients per class and totals."""
    table = frame.pivot_table(
        index="tumor_class", columns="magnification", values="path", aggfunc="count", fill_value=0
    )
    table.columns = [f"{m}X" for m in table.columns]
    table["images"] = table.sum(axis=1)
    table["patients"] = frame.groupby("tumor_class")["patient_id"].nunique()
    order = [name for name in SUBTYPES if name in table.index]
    table = table.loc[order]
    table.loc["total"] = table.sum(numeric_only=True)
    table.loc["total", "patients"] = frame["patient_id"].nunique()
    return table.astype(int)
