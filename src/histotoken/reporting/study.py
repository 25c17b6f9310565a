"""The files of one study folder, loaded once for every report section.

Only the study-level tables are read here (``results.csv``, ``runs.csv``, ``efficiency.csv``,
``dataset.json``, ``spec.yaml`` and ``splits/*.csv``); a section that needs a run folder's own files
reads them itself, from the folders :meth:`StudyFiles.run_folders` lists.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import yaml

from histotoken.formats import EVAL_DIR, RUNS_DIR, SPLITS_DIR, StudyPaths
from histotoken.reporting import tables

if TYPE_CHECKING:
    from histotoken.data.sources import SourceWords

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StudyFiles:
    """Everything the report reads, loaded once; optional files are None when missing."""

    root: Path
    results: pd.DataFrame
    summary: pd.DataFrame  # results averaged over seeds (tables.mean_over_seeds)
    runs: pd.DataFrame | None
    efficiency: pd.DataFrame | None
    dataset: dict | None
    spec: dict | None
    split_files: dict[str, pd.DataFrame]

    @property
    def paths(self) -> StudyPaths:
        return StudyPaths(self.root)

    @property
    def tasks(self) -> list[str]:
        return tables.ordered_unique(self.summary["task"])

    @property
    def models(self) -> list[str]:
        source = self.runs["model"] if self.runs is not None and "model" in self.runs else self.summary["model"]
        return tables.ordered_unique([*source, *self.summary["model"]])

    @property
    def synthetic(self) -> bool:
        """dataset.json decides; without it, any evaluation file that says synthetic does."""
        if self.dataset is not None:
            return bool(self.dataset.get("synthetic", False))
        for path in sorted(self.root.glob(f"{RUNS_DIR}/*/{EVAL_DIR}/*.json"))[:20]:
            evaluation = tables.read_json_if_present(path)
            if isinstance(evaluation, dict) and evaluation.get("synthetic"):
                return True
        return False

    @functools.cached_property
    def kind(self) -> str:
        """The kind of data (breakhis, imagefolder, cifar10, tiles), read from the study's files."""
        from histotoken.reporting.words import data_kind

        return data_kind(self)

    @functools.cached_property
    def words(self) -> SourceWords:
        """How this study's data names its groups and classes, and whether it has magnifications."""
        from histotoken.reporting.words import words_of

        return words_of(self.kind)

    def run_folders(self) -> list[tuple[str, Path]]:
        """(run_id, folder) for every run listed in runs.csv, or else found in results.csv."""
        if self.runs is not None and "run_id" in self.runs.columns:
            run_dirs = self.runs["run_dir"] if "run_dir" in self.runs.columns else [None] * len(self.runs)
            pairs = zip(self.runs["run_id"], run_dirs)
        else:
            pairs = ((run_id, None) for run_id in tables.ordered_unique(self.results["run_id"]))
        folders = []
        for run_id, run_dir in pairs:
            folder = self.paths.run_dir(str(run_id))
            if isinstance(run_dir, str) and run_dir:
                candidate = Path(run_dir) if Path(run_dir).is_absolute() else self.root / run_dir
                folder = candidate if candidate.is_dir() else folder
            folders.append((str(run_id), folder))
        return folders

    def run_info(self) -> dict[str, dict]:
        """run_id -> its row of runs.csv (or, without runs.csv, its first row of results.csv)."""
        if self.runs is not None and "run_id" in self.runs.columns:
            frame = self.runs
        else:
            frame = self.results.drop_duplicates("run_id")
        return {str(row["run_id"]): row for row in frame.to_dict("records")}


def load_study(study_dir: Path) -> StudyFiles:
    """Read a study folder; raise a one-line error when it is not one."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise FileNotFoundError(
            f"{study_dir} is not a folder; pass the folder written by `histotoken grid SPEC --out STUDY_DIR`"
        )
    paths = StudyPaths(study_dir)
    results = tables.read_results(paths.results_table)
    runs = tables.read_runs(paths.runs_table)
    dataset = tables.read_json_if_present(paths.dataset)
    split_files = {}
    for path in sorted((study_dir / SPLITS_DIR).glob("*.csv")):
        frame = tables.read_csv_if_present(path, {"path": str, "patient_id": str, "tumor_class": str})
        if frame is not None:
            split_files[path.name] = frame
    return StudyFiles(
        root=study_dir,
        results=results,
        summary=tables.mean_over_seeds(results),
        runs=runs,
        efficiency=tables.read_efficiency(paths.efficiency_table),
        dataset=dataset if isinstance(dataset, dict) else None,
        spec=read_yaml_mapping(paths.spec),
        split_files=split_files,
    )


def read_yaml_mapping(path: Path) -> dict | None:
    """A YAML file holding a mapping, or None (logged) when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        logger.warning("cannot read %s: %s", path, error)
        return None
    return spec if isinstance(spec, dict) else None
