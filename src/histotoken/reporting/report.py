"""``build_report``: a study folder's files -> ``report.html``, ``report.md`` and ``figures/*.png``.

The report is rebuilt from the files alone (``docs/formats.md``, "Study folder"); nothing is
re-run and no model code is imported. The page is built once as a list of sections made of
small blocks (paragraphs, tables, figures, notes), then rendered twice: as one self-contained
HTML file (CSS and PNG figures inline, no scripts, no external links) and as Markdown that
refers to the PNG files in ``figures/``. A missing or unreadable file turns into a note in its
section; only a folder without ``results.csv`` is an error.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from histotoken.io import atomic_write_bytes, atomic_write_text
from histotoken.reporting import plots, tables

logger = logging.getLogger(__name__)

MISSING = "—"
PREVIEW_PER_CELL = 2
PREVIEW_THUMBNAIL_PX = (96, 64)  # BreakHis images are 700 x 460
SYNTHETIC_BANNER = (
    "Synthetic data. Every number in this report comes from procedurally generated images "
    "(made by `histotoken synth`), not from real tissue. They show that the pipeline runs end to end "
    "and say nothing about how these models perform on real pathology."
)
# config.yaml fields that the grid sets per run (histotoken.experiments.spec.PER_RUN_KEYS).
PER_RUN_CONFIG_KEYS = {"data", "model", "task", "train_domain", "splits", "seed", "fold"}
NO_RESULTS = "results.csv has no result rows yet (no run has been evaluated): nothing to compare."
SECTION_TITLES = {
    "setup": "What was run",
    "in_domain": "In-domain performance and cost",
    "cross_domain": "Cross-magnification generalisation",
    "cost": "Accuracy versus cost",
    "runs": "Per-run details",
    "preview": "Dataset preview",
    "failed": "Failed runs",
}


# --------------------------------------------------------------------------- page blocks


@dataclasses.dataclass
class Paragraph:
    text: str


@dataclasses.dataclass
class Note:
    text: str


@dataclasses.dataclass
class Heading:
    text: str
    level: int = 3


@dataclasses.dataclass
class Table:
    frame: pd.DataFrame  # cells already formatted as text
    caption: str = ""


@dataclasses.dataclass
class FigureBlock:
    name: str  # file name under figures/
    png: bytes
    caption: str
    how_to_read: str


@dataclasses.dataclass
class Preformatted:
    text: str


@dataclasses.dataclass
class Details:
    summary: str
    blocks: list
    open: bool = False


@dataclasses.dataclass
class Section:
    key: str
    title: str
    blocks: list


# --------------------------------------------------------------------------- study files


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
    def tasks(self) -> list[str]:
        return tables.ordered_unique(self.summary["task"])

    @property
    def models(self) -> list[str]:
        source = self.runs["model"] if self.runs is not None and "model" in self.runs else self.summary["model"]
        return tables.ordered_unique([*source, *self.summary["model"]])


def load_study(study_dir: Path) -> StudyFiles:
    """Read a study folder; raise a one-line error when it is not one."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise FileNotFoundError(
            f"{study_dir} is not a folder; pass the folder written by `histotoken grid SPEC --out STUDY_DIR`"
        )
    results = tables.read_results(study_dir / "results.csv")
    runs = tables.read_runs(study_dir / "runs.csv")
    dataset = tables.read_json_if_present(study_dir / "dataset.json")
    split_files = {}
    for path in sorted((study_dir / "splits").glob("*.csv")):
        frame = tables.read_csv_if_present(path, {"path": str, "patient_id": str, "tumor_class": str})
        if frame is not None:
            split_files[path.name] = frame
    return StudyFiles(
        root=study_dir,
        results=results,
        summary=tables.mean_over_seeds(results),
        runs=runs,
        efficiency=tables.read_efficiency(study_dir / "efficiency.csv"),
        dataset=dataset if isinstance(dataset, dict) else None,
        spec=_read_spec(study_dir / "spec.yaml"),
        split_files=split_files,
    )


def _read_spec(path: Path) -> dict | None:
    return _read_yaml_mapping(path)


def _read_yaml_mapping(path: Path) -> dict | None:
    """A YAML file holding a mapping, or None (logged) when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        logger.warning("cannot read %s: %s", path, error)
        return None
    return spec if isinstance(spec, dict) else None


# --------------------------------------------------------------------------- formatting


def format_number(value: Any, digits: int | None = None) -> str:
    """Numbers for tables: NaN -> an em dash; without ``digits``, precision follows magnitude."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value) if value not in (None, "") else MISSING
    if np.isnan(number):
        return MISSING
    if digits is not None:
        return f"{number:.{digits}f}"
    if abs(number) >= 100:
        return f"{number:,.0f}"
    if abs(number) >= 10:
        return f"{number:.1f}"
    if 0 < abs(number) < 1:
        return f"{number:.2g}"  # small costs (e.g. 0.017 GFLOPs at 32 px) keep two significant digits
    return f"{number:.2f}"


def format_estimate(value: float, low: float, high: float, digits: int = 2) -> str:
    """``0.81 [0.75, 0.86]``; the interval is left out when the file has none."""
    if np.isnan(value):
        return MISSING
    if np.isnan(low) or np.isnan(high):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _format_efficiency(table: pd.DataFrame) -> pd.DataFrame:
    """Rename and format the efficiency columns present in ``table``."""
    shown = pd.DataFrame(index=table.index)
    for column, heading in tables.EFFICIENCY_COLUMNS.items():
        if column not in table.columns:
            continue
        if column == "tokens_final":
            shown[heading] = [MISSING if pd.isna(v) else str(int(v)) for v in table[column]]
        else:
            shown[heading] = [format_number(v) for v in table[column]]
    return shown


def _flatten(mapping: Any, prefix: str = "") -> dict[str, str]:
    """Nested dict -> ``{"a.b": "value"}`` with lists written inline."""
    if not isinstance(mapping, dict):
        return {prefix or "value": _inline(mapping)}
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name))
        else:
            flat[name] = _inline(value)
    return flat


def _inline(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_inline(item) for item in value) if value else "(none)"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if value is None:
        return MISSING
    return str(value)


def _key_value_table(pairs: dict[str, str], key_heading: str = "setting") -> Table:
    return Table(pd.DataFrame({key_heading: list(pairs), "value": list(pairs.values())}))


def _file_name(text: str) -> str:
    """A run id or model label as a safe file-name part (``@``, ``=``, ``+`` and ``,`` become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "unnamed"


def _find_key(mapping: dict | None, names: tuple[str, ...]) -> Any | None:
    """The first of ``names`` found at the top level of ``mapping``, else one level down."""
    if not mapping:
        return None
    for name in names:
        if name in mapping:
            return mapping[name]
    for value in mapping.values():
        if isinstance(value, dict):
            for name in names:
                if name in value:
                    return value[name]
    return None


# --------------------------------------------------------------------------- sections


class _ReportBuilder:
    """Builds the sections of one study's report from its files."""

    def __init__(self, study: StudyFiles) -> None:
        self.study = study
        self.multiple_tasks = len(study.tasks) > 1
        # Sub-headings sit below a "Task: ..." heading only when the study has several tasks.
        self.sub_level = 4 if self.multiple_tasks else 3
        self._figure_names: set[str] = set()

    def build(self) -> list[Section]:
        builders: dict[str, Callable[[], list]] = {
            "setup": self.setup_section,
            "in_domain": self.in_domain_section,
            "cross_domain": self.cross_domain_section,
            "cost": self.cost_section,
            "runs": self.runs_section,
            "preview": self.preview_section,
            "failed": self.failed_section,
        }
        sections = []
        for key, build in builders.items():
            if key in ("in_domain", "cross_domain", "cost") and self.study.summary.empty:
                sections.append(Section(key, SECTION_TITLES[key], [Note(NO_RESULTS)]))
                continue
            try:
                blocks = build()
            except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
                # A malformed file must not cost the user the rest of the report.
                logger.warning("report section %r could not be built: %s", SECTION_TITLES[key], error)
                logger.debug("details", exc_info=True)
                blocks = [Note(f"This section could not be built from the study files: {error}")]
            sections.append(Section(key, SECTION_TITLES[key], blocks))
        return sections

    def _label(self, model: str, task: str) -> str:
        return f"{model} ({task})" if self.multiple_tasks else model

    def _task_heading(self, task: str, blocks: list) -> None:
        if self.multiple_tasks:
            blocks.append(Heading(f"Task: {task}", level=3))

    # ----------------------------------------------------------------- 1. what was run

    @property
    def synthetic(self) -> bool:
        """dataset.json decides; without it, any evaluation file that says synthetic does."""
        if self.study.dataset is not None:
            return bool(self.study.dataset.get("synthetic", False))
        for path in sorted(self.study.root.glob("runs/*/eval/*.json"))[:20]:
            evaluation = tables.read_json_if_present(path)
            if isinstance(evaluation, dict) and evaluation.get("synthetic"):
                return True
        return False

    def setup_section(self) -> list:
        study = self.study
        blocks: list = [Heading("Data set")]
        dataset = study.dataset
        if dataset is None:
            blocks.append(Note("dataset.json is missing: the data set cannot be described."))
        else:
            kind = (
                "synthetic (procedurally generated by `histotoken synth`)"
                if dataset.get("synthetic") else "real images (a BreakHis-style folder)"
            )
            blocks.append(Paragraph(
                f"Data root: {dataset.get('data_root', MISSING)}. Kind: {kind}. "
                f"{format_number(dataset.get('n_images'), 0)} images from "
                f"{format_number(dataset.get('n_patients'), 0)} patients."
            ))
            if dataset.get("n_skipped"):
                blocks.append(Note(f"{dataset['n_skipped']} image(s) in the data folder could not be read and "
                                   "were left out of the index (`histotoken index` lists them)."))
            images, patients = tables.dataset_count_tables(dataset)
            if images.empty:
                blocks.append(Note("dataset.json has no per-class counts."))
            else:
                blocks.append(Table(_index_to_column(images.astype(str), "tumour class"),
                                    "Images per tumour class (rows) and magnification (columns)."))
                if not patients.empty:
                    blocks.append(Table(
                        _index_to_column(patients.astype(str), "tumour class"),
                        "Patients per tumour class and magnification (a patient has images at several "
                        "magnifications, so these are not summed).",
                    ))
        blocks += self._split_blocks()
        blocks += self._models_blocks()
        blocks += self._protocol_blocks()
        blocks += self._environment_blocks()
        if study.spec is not None:
            blocks.append(Details("Full study specification (spec.yaml)",
                                  [Preformatted(yaml.safe_dump(study.spec, sort_keys=False))]))
        return blocks

    def _split_blocks(self) -> list:
        study = self.study
        blocks: list = [Heading("Splits, seeds and folds")]
        scheme = _find_key(study.spec, ("split", "splits", "split_scheme"))
        if isinstance(scheme, dict):
            settings = ", ".join(f"{key} = {value}" for key, value in _flatten(scheme).items())
            blocks.append(Paragraph(f"Split scheme (spec.yaml): {settings}."))
        elif scheme is not None:
            blocks.append(Paragraph(f"Split scheme (spec.yaml): {_inline(scheme)}."))
        else:
            blocks.append(Note("spec.yaml does not name a split scheme."))
        seeds = tables.ordered_unique(study.results["seed"])
        folds = _find_key(study.spec, ("folds", "n_folds", "num_folds"))
        text = f"Seeds (or folds) in results.csv: {', '.join(map(str, seeds)) or MISSING}."
        if folds:
            text += f" Folds (spec.yaml): {_inline(folds)}; the seed column holds the fold number."
        if study.split_files:
            text += f" Frozen split files: {', '.join('splits/' + name for name in study.split_files)}."
        blocks.append(Paragraph(text))
        summary = tables.split_summary(study.split_files)
        if summary.empty:
            blocks.append(Note("No readable split file in splits/: split sizes cannot be shown."))
        else:
            shown = summary.copy()
            shown["patient_disjoint"] = shown["patient_disjoint"].map({True: "yes", False: "NO"})
            shown = shown.rename(columns={"patient_disjoint": "patient-disjoint"}).astype(str)
            blocks.append(Table(shown, "Images and patients per split; patient-disjoint means no patient "
                                       "has images on two sides of the split."))
        return blocks

    def _models_blocks(self) -> list:
        study = self.study
        train_domains = tables.sort_domains(study.summary["train_domain"])
        test_domains = tables.sort_domains(study.summary["test_domain"])
        text = (
            f"Models: {', '.join(study.models)}. Task(s): {', '.join(study.tasks)}. "
            f"Train domains: {', '.join(train_domains)}. Test domains: {', '.join(test_domains)}. "
            "A domain is a magnification (100 = 100x) or a '+'-joined set of them trained on together."
        )
        if study.runs is not None and "status" in study.runs.columns:
            counts = study.runs["status"].fillna("unknown").value_counts()
            text += " Runs: " + ", ".join(f"{n} {status}" for status, n in counts.items()) + "."
        return [Heading("Models and domains"), Paragraph(text)]

    def _protocol_blocks(self) -> list:
        """The resolved run configuration (config.yaml of the first run), less what differs per run."""
        blocks: list = [Heading("Training protocol")]
        protocol = _find_key(self.study.spec, ("protocol", "training", "train"))
        if isinstance(protocol, dict) and protocol:
            settings = ", ".join(f"{key} = {value}" for key, value in _flatten(protocol).items())
            blocks.append(Paragraph(f"Set by the study (spec.yaml protocol): {settings}. "
                                    "Everything else is histotoken's default."))
        for run_id, run_dir in self._run_folders():
            config = _read_yaml_mapping(run_dir / "config.yaml")
            if config is None:
                continue
            shared = {key: value for key, value in config.items() if key not in PER_RUN_CONFIG_KEYS}
            blocks.append(Paragraph(f"Resolved settings shared by the runs (from runs/{run_id}/config.yaml; "
                                    "model, task, train domain, split file and seed differ per run):"))
            blocks.append(_key_value_table(_flatten(shared)))
            return blocks
        if isinstance(protocol, dict) and protocol:
            blocks.append(Note("No run folder has a config.yaml: only the values the study set are known."))
        else:
            blocks.append(Note("Neither spec.yaml nor any run's config.yaml describes the training protocol."))
        return blocks

    def _environment_blocks(self) -> list:
        blocks: list = [Heading("Environment")]
        environments = []
        for run_id, run_dir in self._run_folders():
            environment = tables.read_json_if_present(run_dir / "environment.json")
            if isinstance(environment, dict):
                environments.append((run_id, environment))
        if not environments:
            blocks.append(Note("No run folder has an environment.json: the software and hardware are unknown."))
            return blocks
        run_id, environment = environments[0]
        packages = environment.get("packages") or {}
        gpu = environment.get("gpu")
        pairs = {
            "python": _inline(environment.get("python")),
            "torch": _inline(packages.get("torch")),
            "timm": _inline(packages.get("timm")),
            "lightning": _inline(packages.get("lightning")),
            "CPU": _inline(environment.get("cpu")),
            "GPU": _inline(gpu) if gpu else "none (CPU only)",
            "platform": _inline(environment.get("platform")),
            "git revision": _inline(environment.get("git_revision")),
        }
        blocks.append(Paragraph(f"From runs/{run_id}/environment.json."))
        blocks.append(_key_value_table(pairs))
        distinct = {
            json.dumps([(e.get("packages") or {}).get("torch"), e.get("cpu"), e.get("gpu")], default=str)
            for _, e in environments
        }
        if len(distinct) > 1:
            blocks.append(Note(f"The runs report {len(distinct)} different torch/CPU/GPU combinations: "
                               "timings and numbers may not be comparable across runs."))
        return blocks

    def _run_folders(self) -> list[tuple[str, Path]]:
        """(run_id, folder) for every run listed in runs.csv, or else found in results.csv."""
        study = self.study
        if study.runs is not None and "run_id" in study.runs.columns:
            run_dirs = study.runs["run_dir"] if "run_dir" in study.runs.columns else [None] * len(study.runs)
            pairs = zip(study.runs["run_id"], run_dirs)
        else:
            pairs = ((run_id, None) for run_id in tables.ordered_unique(study.results["run_id"]))
        folders = []
        for run_id, run_dir in pairs:
            folder = study.root / "runs" / str(run_id)
            if isinstance(run_dir, str) and run_dir:
                candidate = Path(run_dir) if Path(run_dir).is_absolute() else study.root / run_dir
                folder = candidate if candidate.is_dir() else folder
            folders.append((str(run_id), folder))
        return folders

    # ----------------------------------------------------------------- 2. headline

    def in_domain_section(self) -> list:
        study = self.study
        blocks: list = [Paragraph(
            "Each row is one model trained and tested on the same magnification (in-domain), on the "
            "held-out patients of the test split. Each value is followed by its 95% interval as the evaluation "
            "wrote it (a bootstrap over test patients; the value alone where the file has no interval). With "
            "several seeds or folds, values and interval bounds are averaged over them. Patient-level accuracy "
            "is the BreakHis patient recognition rate: the mean over test patients of the fraction of their "
            "images classified correctly."
        )]
        table = tables.in_domain_table(study.summary)
        if table.empty:
            return blocks + [Note("results.csv has no in-domain rows (test domain = train domain).")]
        table = tables.join_efficiency(table, study.efficiency)
        shown = pd.DataFrame({"model": table["model"]})
        if self.multiple_tasks:
            shown["task"] = table["task"]
        shown["train = test"] = table["train_domain"]
        shown["seeds"] = table["n_seeds"].astype(str)
        for metric in tables.METRICS:
            shown[tables.METRIC_LABELS[metric]] = [
                format_estimate(v, lo, hi)
                for v, lo, hi in zip(table[metric], table[f"{metric}_low"], table[f"{metric}_high"])
            ]
        shown = pd.concat([shown, _format_efficiency(table)], axis=1)
        blocks.append(Table(shown))
        if study.efficiency is None:
            blocks.append(Note("efficiency.csv is missing: latency, throughput, memory, parameters, GFLOPs and "
                               "tokens are not shown. Run `histotoken benchmark` for the study's models and save "
                               "it as efficiency.csv in the study folder."))
        else:
            blocks.append(Paragraph(self._benchmark_conditions()))
        return blocks

    def _benchmark_conditions(self) -> str:
        efficiency = self.study.efficiency
        parts = []
        for column, name in (("device", "device"), ("precision", "precision"), ("img_size", "image size"),
                             ("batch_size", "batch size")):
            if efficiency is not None and column in efficiency.columns:
                values = tables.ordered_unique(efficiency[column].astype(str))
                parts.append(f"{name} {', '.join(values)}")
        conditions = "; ".join(parts) if parts else "conditions not recorded"
        return (f"Efficiency columns come from efficiency.csv (all models measured side by side in one "
                f"process: {conditions}). Tokens at head is the number of tokens entering the classifier "
                "(empty for CNNs).")

    # ----------------------------------------------------------------- 3. cross-domain

    def cross_domain_section(self) -> list:
        blocks: list = [Paragraph(
            "Macro-F1 of every model trained on one magnification (row) and tested on another (column). "
            "The diagonal is in-domain; everything off it measures how well a model survives a change of "
            "magnification. Values are averaged over seeds."
        )]
        for task in self.study.tasks:
            self._task_heading(task, blocks)
            blocks += self._cross_domain_for_task(task)
        return blocks

    def _cross_domain_for_task(self, task: str) -> list:
        summary = self.study.summary[self.study.summary["task"] == task]
        blocks: list = []
        matrices = {}
        for model, _ in tables.model_task_pairs(summary):
            matrix = tables.cross_domain_matrix(summary, model, task)
            matrices[self._label(model, task)] = matrix
            blocks.append(Heading(f"Macro-F1 matrix: {self._label(model, task)}", level=self.sub_level))
            blocks.append(Table(_matrix_table(matrix)))
        if any(matrix.size > 1 for matrix in matrices.values()):
            blocks.append(self._figure(
                f"cross_domain_heatmap_{_file_name(task)}",
                plots.cross_domain_heatmaps(matrices),
                "Cross-magnification macro-F1 per model.",
                "Each cell is the macro-F1 on the column's test magnification of the model trained on the "
                "row's; compare each cell with its row's diagonal cell: the darker it is, the more the model "
                "lost by changing magnification.",
            ))
        else:
            blocks.append(Note("Every model has a single train/test cell: no heatmap is drawn."))

        cross = tables.cross_domain_summary(summary)
        blocks.append(Heading("In-domain versus cross-domain", level=self.sub_level))
        shown = pd.DataFrame({
            "model": [self._label(m, t) for m, t in zip(cross["model"], cross["task"])],
            "in-domain mean": [format_number(v, 3) for v in cross["in_domain_mean"]],
            "cross-domain mean (off-diagonal)": [format_number(v, 3) for v in cross["cross_domain_mean"]],
            "unseen-magnification mean": [format_number(v, 3) for v in cross["unseen_mean"]],
            "drop (in - cross)": [format_number(v, 3) for v in cross["drop"]],
        })
        blocks.append(Table(shown, "Cross-domain mean = mean of all off-diagonal cells; unseen-magnification "
                                   "mean keeps only cells whose test magnification was not in training "
                                   "(e.g. 100 -> 400 but not 100+400 -> 100)."))
        if cross["cross_domain_mean"].notna().any():
            blocks.append(self._figure(
                f"in_vs_cross_domain_{_file_name(task)}",
                plots.in_vs_cross_bars(cross, list(shown["model"])),
                "Mean in-domain versus mean cross-domain macro-F1 per model.",
                "For each model the blue bar averages the diagonal of its matrix and the orange bar the "
                "off-diagonal cells; the gap between them is what a change of magnification costs.",
            ))
        else:
            blocks.append(Note("No run was tested on a magnification other than its own: "
                               "no cross-domain bars are drawn."))
        blocks += self._asymmetry_blocks(summary)
        blocks += self._mixed_blocks(summary)
        return blocks

    def _asymmetry_blocks(self, summary: pd.DataFrame) -> list:
        blocks: list = [Heading("Directional asymmetry", level=self.sub_level)]
        asymmetry = tables.asymmetry_table(summary)
        if asymmetry.empty:
            return blocks + [Note("Needs two single magnifications each used both for training and for "
                                  "testing (e.g. 100 and 400); this study has none.")]
        shown = pd.DataFrame({
            "model": [self._label(m, t) for m, t in zip(asymmetry["model"], asymmetry["task"])],
            "low -> high": [f"{a} -> {b}" for a, b in zip(asymmetry["low"], asymmetry["high"])],
            "F1 low -> high": [format_number(v, 3) for v in asymmetry["low_to_high"]],
            "high -> low": [f"{b} -> {a}" for a, b in zip(asymmetry["low"], asymmetry["high"])],
            "F1 high -> low": [format_number(v, 3) for v in asymmetry["high_to_low"]],
            "difference": [f"{v:+.3f}" for v in asymmetry["difference"]],
        })
        return blocks + [Table(shown, "Difference = F1(low -> high) - F1(high -> low); positive means the "
                                      "model transfers better from the lower to the higher magnification.")]

    def _mixed_blocks(self, summary: pd.DataFrame) -> list:
        blocks: list = [Heading("Training on mixed magnifications", level=self.sub_level)]
        mixed = tables.mixed_training_table(summary)
        if mixed.empty:
            return blocks + [Note("No mixed train domain (such as 100+400) in this study.")]
        single_columns = [c for c in mixed.columns if c.startswith("train ")]
        shown = pd.DataFrame({
            "model": [self._label(m, t) for m, t in zip(mixed["model"], mixed["task"])],
            "mixed train domain": mixed["mixed_domain"],
            "test domain": mixed["test_domain"],
            "F1 mixed": [format_number(v, 3) for v in mixed["mixed"]],
        })
        for column in single_columns:
            shown[f"F1 {column}"] = [format_number(v, 3) for v in mixed[column]]
        shown["mixed - best single"] = [MISSING if np.isnan(v) else f"{v:+.3f}" for v in mixed["mixed_minus_best"]]
        return blocks + [Table(shown, "Each mixed-magnification run next to the single-magnification runs of "
                                      "the same model on the same test domain.")]

    # ----------------------------------------------------------------- 4. accuracy vs cost

    def cost_section(self) -> list:
        efficiency = self.study.efficiency
        blocks: list = [Paragraph(
            "In-domain macro-F1 (averaged over train magnifications and seeds) against measured cost. A model "
            "is on the Pareto front when no other model is at least as accurate and at least as cheap, and "
            "strictly better on one of the two."
        )]
        if efficiency is None:
            return blocks + [Note("efficiency.csv is missing: accuracy cannot be set against cost. Run "
                                  "`histotoken benchmark` for the study's models and save it as efficiency.csv.")]
        for task in self.study.tasks:
            self._task_heading(task, blocks)
            table = tables.accuracy_cost_table(self.study.summary, efficiency, task)
            yes_no = {True: "yes", False: "no"}
            blocks.append(Table(pd.DataFrame({
                "model": table["model"],
                "in-domain macro-F1": [format_number(v, 3) for v in table["macro_f1"]],
                "throughput (img/s)": [format_number(v) for v in table["throughput_img_s"]],
                "GFLOPs": [format_number(v) for v in table["gflops"]],
                "Pareto: F1 vs throughput": table["pareto_throughput"].map(yes_no),
                "Pareto: F1 vs GFLOPs": table["pareto_gflops"].map(yes_no),
            })))
            suffix = _file_name(task)
            for column, label, front, lower, how in (
                ("throughput_img_s", "throughput (images/s)", "pareto_throughput", False,
                 "no other model is both more accurate and faster"),
                ("gflops", "GFLOPs per image", "pareto_gflops", True,
                 "no other model is both more accurate and needs fewer GFLOPs"),
            ):
                usable = table.dropna(subset=["macro_f1", column])
                if len(usable) < 2:
                    blocks.append(Note(f"Fewer than two models have both macro-F1 and {label}: "
                                       "no scatter plot is drawn."))
                    continue
                blocks.append(self._figure(
                    f"f1_vs_{column}_{suffix}",
                    plots.pareto_scatter(table, column, label, front, lower_x_is_better=lower),
                    f"In-domain macro-F1 versus {label}.",
                    f"Each point is one model; red diamonds joined by the dashed line are the Pareto front "
                    f"({how}); up and to the {'left' if lower else 'right'} is better.",
                ))
        return blocks

    # ----------------------------------------------------------------- 5. per run

    def runs_section(self) -> list:
        blocks: list = [Paragraph(
            "For every run that finished: the confusion matrix on its own training magnification's test "
            "split (eval/<train domain>.json) and its training curves (metrics.csv)."
        )]
        info = self._run_info()
        failed = {run_id for run_id, row in info.items() if row.get("status") == "failed"}
        shown_any = False
        for run_id, run_dir in self._run_folders():
            if run_id in failed:
                continue
            row = info.get(run_id, {})
            summary = (f"{run_id}: {row.get('model', MISSING)}, trained on {row.get('train_domain', MISSING)}, "
                       f"seed {row.get('seed', MISSING)}")
            blocks.append(Details(summary, self._run_blocks(run_id, run_dir, row), open=not shown_any))
            shown_any = True
        if not shown_any:
            blocks.append(Note("No finished run to show."))
        return blocks

    def _run_info(self) -> dict[str, dict]:
        study = self.study
        if study.runs is not None and "run_id" in study.runs.columns:
            frame = study.runs
        else:
            frame = study.results.drop_duplicates("run_id")
        return {str(row["run_id"]): row for row in frame.to_dict("records")}

    def _run_blocks(self, run_id: str, run_dir: Path, row: dict) -> list:
        blocks: list = []
        if not run_dir.is_dir():
            return [Note(f"The run folder {run_dir} is missing.")]
        status = tables.read_json_if_present(run_dir / "status.json")
        if isinstance(status, dict):
            stages = status.get("stages") or status.get("stages_done") or []
            blocks.append(Paragraph(
                f"State: {status.get('state', MISSING)}; best epoch: {status.get('best_epoch', MISSING)}"
                + (f"; stages: {', '.join(map(str, stages))}" if stages else "") + "."
            ))
        train_domain = str(row.get("train_domain", ""))
        evaluation = tables.read_json_if_present(run_dir / "eval" / f"{train_domain}.json")
        if isinstance(evaluation, dict) and evaluation.get("confusion_matrix") and evaluation.get("class_names"):
            blocks.append(self._figure(
                f"run_{_file_name(run_id)}_confusion",
                plots.confusion_matrix_figure(
                    np.asarray(evaluation["confusion_matrix"]), evaluation["class_names"],
                    f"{row.get('model', run_id)}: trained and tested on {train_domain}",
                ),
                f"Confusion matrix of {run_id} on the {train_domain} test split.",
                "Rows are the true class and columns the predicted one; numbers count images and the colour "
                "is the fraction of the row, so dark cells off the diagonal are the classes this model confuses.",
            ))
        else:
            blocks.append(Note(f"eval/{train_domain}.json is missing or has no confusion matrix: "
                               "no confusion matrix for this run."))
        metrics = tables.read_csv_if_present(run_dir / "metrics.csv", {"stage": str})
        if metrics is not None and len(metrics):
            blocks.append(self._figure(
                f"run_{_file_name(run_id)}_curves",
                plots.training_curves_figure(metrics, f"{run_id}"),
                f"Training curves of {run_id}.",
                "Left: training and validation loss per epoch (lower is better; a widening gap means "
                "over-fitting); right: validation macro-F1, the star marks the best epoch; dotted vertical "
                "lines mark where a new training stage began.",
            ))
        else:
            blocks.append(Note("metrics.csv is missing or empty: no training curves for this run."))
        return blocks

    # ----------------------------------------------------------------- 6. preview

    def preview_section(self) -> list:
        study = self.study
        if not study.split_files:
            return [Note("No split file in splits/: there is no list of images to preview.")]
        name, split = next(iter(study.split_files.items()))
        needed = {"path", "tumor_class", "magnification"}
        if not needed <= set(split.columns):
            return [Note(f"splits/{name} lacks the column(s) {', '.join(sorted(needed - set(split.columns)))}.")]
        split = split.assign(magnification=split["magnification"].map(tables.magnification_label))
        classes = tables.class_order(split["tumor_class"])
        magnifications = tables.sort_domains(split["magnification"])
        data_root = Path(str((study.dataset or {}).get("data_root", "")) or study.root)
        thumbnails: dict[tuple[str, str], list[np.ndarray | None]] = {}
        tried, found, first_missing = 0, 0, None
        for (tumor_class, magnification), group in split.groupby(["tumor_class", "magnification"], sort=False):
            if "patient_id" in group.columns:  # prefer examples from different patients
                group = pd.concat([group.drop_duplicates("patient_id"), group]).drop_duplicates("path")
            images = []
            for path_text in group["path"].head(PREVIEW_PER_CELL):
                tried += 1
                path = _resolve_image_path(path_text, data_root, study.root)
                image = _thumbnail(path) if path is not None else None
                if image is None:
                    first_missing = first_missing or path_text
                else:
                    found += 1
                images.append(image)
            thumbnails[(tumor_class, magnification)] = images
        if found == 0:
            return [Note(
                f"The images listed in splits/{name} were not found (first one looked for: {first_missing}; "
                f"data root: {data_root}), so no preview is shown. Make the data available at that path and "
                "re-run `histotoken report`."
            )]
        blocks: list = [self._figure(
            "dataset_preview",
            plots.image_grid_figure(thumbnails, classes, magnifications, PREVIEW_PER_CELL, PREVIEW_THUMBNAIL_PX),
            f"Example images per tumour class and magnification (from splits/{name}).",
            f"Rows are tumour classes and columns magnifications, {PREVIEW_PER_CELL} images each from different "
            "patients where possible; check that each row looks like the tissue its label names.",
        )]
        if found < tried:
            blocks.append(Note(f"{tried - found} of {tried} preview images could not be read "
                               f"(first: {first_missing}); their cells are grey."))
        return blocks

    # ----------------------------------------------------------------- 7. failed runs

    def failed_section(self) -> list:
        runs = self.study.runs
        if runs is None:
            return [Note("runs.csv is missing: failed runs cannot be listed.")]
        if "status" not in runs.columns:
            return [Note("runs.csv has no status column: failed runs cannot be listed.")]
        status = runs["status"].fillna("unknown")
        failed = runs[status == "failed"]
        blocks: list = []
        if failed.empty:
            blocks.append(Paragraph(f"No run failed ({len(runs)} runs in runs.csv)."))
        else:
            columns = [c for c in ("run_id", "model", "task", "train_domain", "seed", "error") if c in failed]
            shown = failed[columns].fillna(MISSING).astype(str).rename(columns={"train_domain": "train domain"})
            blocks.append(Paragraph(f"{len(failed)} of {len(runs)} runs failed; they are missing from every "
                                    "table and figure above."))
            blocks.append(Table(shown.reset_index(drop=True)))
        unfinished = runs[~status.isin(["failed", "finished"])]
        if not unfinished.empty:
            blocks.append(Note(f"{len(unfinished)} run(s) neither finished nor failed (status: "
                               f"{', '.join(tables.ordered_unique(status[unfinished.index]))}); their results "
                               "are missing from this report."))
        return blocks

    # ----------------------------------------------------------------- helpers

    def _figure(self, name: str, figure, caption: str, how_to_read: str) -> FigureBlock:
        stem = _file_name(name)
        # Two run ids may differ only in characters a file name cannot hold: keep both figures.
        unique, counter = stem, 1
        while unique in self._figure_names:
            counter += 1
            unique = f"{stem}_{counter}"
        self._figure_names.add(unique)
        return FigureBlock(f"{unique}.png", plots.figure_to_png(figure), caption, how_to_read)


def _index_to_column(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    shown = frame.copy()
    shown.columns = [str(c) for c in shown.columns]
    shown.insert(0, name, [str(i) for i in shown.index])
    return shown.reset_index(drop=True)


def _matrix_table(matrix: pd.DataFrame) -> pd.DataFrame:
    """Train x test matrix as text: first column ``trained on``, then ``tested on <domain>``."""
    shown = pd.DataFrame({"trained on": [str(d) for d in matrix.index]})
    for column in matrix.columns:
        shown[f"tested on {column}"] = [format_number(v, 3) for v in matrix[column]]
    return shown


def _resolve_image_path(path_text: str, data_root: Path, study_root: Path) -> Path | None:
    path = Path(str(path_text))
    for candidate in (path,) if path.is_absolute() else (data_root / path, study_root / path, path):
        if candidate.is_file():
            return candidate
    return None


def _thumbnail(path: Path) -> np.ndarray | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.draft("RGB", PREVIEW_THUMBNAIL_PX)  # JPEG: decode at reduced size
            image = image.convert("RGB")
            scale = min(PREVIEW_THUMBNAIL_PX[0] / image.width, PREVIEW_THUMBNAIL_PX[1] / image.height)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            return np.asarray(image.resize(size, Image.Resampling.LANCZOS))
    except (OSError, UnidentifiedImageError) as error:
        logger.warning("cannot read preview image %s: %s", path, error)
        return None


# --------------------------------------------------------------------------- rendering

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1180px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
h3 { margin-top: 1.4em; } h4 { margin-bottom: .3em; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: .86em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f2f4f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: bottom; text-align: left; font-size: .85em; color: #555; padding-top: .3em; }
figure { margin: 1em 0 1.6em; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #333; } .how { color: #555; font-size: .88em; }
.banner { background: #fff3cd; border: 2px solid #e0a800; padding: .8em 1em; font-weight: 600; }
.note { background: #f4f6f8; border-left: 4px solid #8a9bb0; padding: .4em .8em; margin: .6em 0; }
details { margin: .5em 0; border: 1px solid #e3e3e3; padding: .3em .8em; }
summary { cursor: pointer; font-weight: 600; } pre { background: #f7f7f7; padding: .8em; overflow-x: auto; }
nav ol { columns: 2; }
"""

_NUMERIC_CELL = re.compile(r"^[+\-]?(\d[\d,]*(\.\d+)?)( \[.*\])?$|^" + MISSING + "$")


def render_html(title: str, sections: list[Section], banner: str | None) -> str:
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if banner:
        parts.append(f'<p class="banner">{_text_html(banner)}</p>')
    parts.append("<nav><ol>" + "".join(
        f'<li><a href="#{section.key}">{html.escape(section.title)}</a></li>' for section in sections
    ) + "</ol></nav>")
    for section in sections:
        parts.append(f'<section id="{section.key}"><h2>{html.escape(section.title)}</h2>')
        parts += [_block_html(block) for block in section.blocks]
        parts.append("</section>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _text_html(text: str) -> str:
    """Escape text for HTML and show `command` spans as code, as Markdown would."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _block_html(block) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{_text_html(block.text)}</p>"
    if isinstance(block, Note):
        return f'<p class="note">Note: {_text_html(block.text)}</p>'
    if isinstance(block, Heading):
        return f"<h{block.level}>{html.escape(block.text)}</h{block.level}>"
    if isinstance(block, Preformatted):
        return f"<pre>{html.escape(block.text)}</pre>"
    if isinstance(block, Table):
        return _table_html(block)
    if isinstance(block, FigureBlock):
        data = base64.b64encode(block.png).decode("ascii")
        return (
            f'<figure><img alt="{html.escape(block.caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_text_html(block.caption)}<br>"
            f'<span class="how">How to read this: {_text_html(block.how_to_read)}</span></figcaption></figure>'
        )
    if isinstance(block, Details):
        inner = "\n".join(_block_html(child) for child in block.blocks)
        opened = " open" if block.open else ""
        return f"<details{opened}><summary>{html.escape(block.summary)}</summary>\n{inner}\n</details>"
    raise TypeError(f"unknown report block {type(block).__name__}")


def _table_html(block: Table) -> str:
    frame = block.frame
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for values in frame.itertuples(index=False):
        cells = []
        for value in values:
            text = str(value)
            numeric = ' class="num"' if _NUMERIC_CELL.match(text) else ""
            cells.append(f"<td{numeric}>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    caption = f"<caption>{_text_html(block.caption)}</caption>" if block.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def markdown_table(frame: pd.DataFrame) -> str:
    """A frame of text cells as a GitHub-flavoured Markdown table (no extra dependency)."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |",
             "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def render_markdown(title: str, sections: list[Section], banner: str | None) -> str:
    parts = [f"# {title}", ""]
    if banner:
        parts += [f"> **{banner}**", ""]
    for section in sections:
        parts += [f"## {section.title}", ""]
        parts += [_block_markdown(block) for block in section.blocks]
    return "\n".join(parts).rstrip() + "\n"


def _block_markdown(block, details_level: int = 3) -> str:
    if isinstance(block, Paragraph):
        return block.text + "\n"
    if isinstance(block, Note):
        return f"> Note: {block.text}\n"
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}\n"
    if isinstance(block, Preformatted):
        return f"```yaml\n{block.text.rstrip()}\n```\n"
    if isinstance(block, Table):
        caption = f"\n*{block.caption}*\n" if block.caption else ""
        return markdown_table(block.frame) + "\n" + caption
    if isinstance(block, FigureBlock):
        return f"![{block.caption}](figures/{block.name})\n\n*How to read this:* {block.how_to_read}\n"
    if isinstance(block, Details):
        inner = "\n".join(_block_markdown(child) for child in block.blocks)
        return f"{'#' * details_level} {block.summary}\n\n{inner}"
    raise TypeError(f"unknown report block {type(block).__name__}")


def _figures(sections: list[Section]) -> list[FigureBlock]:
    found = []

    def visit(blocks: list) -> None:
        for block in blocks:
            if isinstance(block, FigureBlock):
                found.append(block)
            elif isinstance(block, Details):
                visit(block.blocks)

    for section in sections:
        visit(section.blocks)
    return found


# --------------------------------------------------------------------------- entry point


def build_report(study_dir: Path, out: Path | None = None) -> Path:
    """Rebuild a study's report from its files; return the path of ``report.html``.

    Writes ``out`` (default ``STUDY_DIR/report.html``), ``report.md`` beside it (same stem) and
    the figures as PNG in ``figures/`` beside it. Raises ``FileNotFoundError`` when
    ``study_dir`` is not a study folder (no ``results.csv``).
    """
    study_dir = Path(study_dir)
    study = load_study(study_dir)
    out = Path(out) if out is not None else study_dir / "report.html"
    logger.info("building the report of %s", study_dir)
    builder = _ReportBuilder(study)
    sections = builder.build()
    banner = SYNTHETIC_BANNER if builder.synthetic else None
    spec_name = (study.spec or {}).get("name") if isinstance(study.spec, dict) else None
    title = f"histotoken study report: {spec_name or study_dir.resolve().name}"

    figures = _figures(sections)
    for figure in figures:
        atomic_write_bytes(out.parent / "figures" / figure.name, figure.png)
    atomic_write_text(out.with_suffix(".md"), render_markdown(title, sections, banner))
    atomic_write_text(out, render_html(title, sections, banner))
    logger.info("wrote %s, %s and %d figures in %s", out, out.with_suffix(".md").name, len(figures),
                out.parent / "figures")
    return out
