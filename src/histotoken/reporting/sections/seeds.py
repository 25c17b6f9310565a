"""Report section "Mean ± SD over seeds": each cell with several seeds or folds, as eva reports probes."""

from __future__ import annotations

import numpy as np
import pandas as pd

from histotoken.reporting import tables
from histotoken.reporting.blocks import Paragraph, Table
from histotoken.reporting.formatting import MISSING
from histotoken.reporting.sections.context import ReportSection, SectionContext
from histotoken.reporting.study import StudyFiles


def format_mean_sd(mean: float, sd: float, digits: int = 3) -> str:
    """``0.812 ± 0.034`` (the mean alone when the SD is missing)."""
    if mean is None or np.isnan(mean):
        return MISSING
    return f"{mean:.{digits}f}" if sd is None or np.isnan(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def build(context: SectionContext) -> list:
    table = tables.seed_spread_table(context.study.summary)
    shown = pd.DataFrame({"model": table["model"]})
    if context.multiple_tasks:
        shown["task"] = table["task"]
    shown["train"] = table["train_domain"]
    shown["test"] = table["test_domain"]
    shown["seeds"] = table["n_seeds"].astype(str)
    for metric in tables.METRICS:
        shown[tables.METRIC_LABELS[metric]] = [
            format_mean_sd(mean, sd) for mean, sd in zip(table[metric], table[f"{metric}_sd"])
        ]
    return [
        Paragraph(
            "Every cell (model, train domain, test domain) that has several seeds or folds: the mean of the per-seed "
            "values and their standard deviation (ddof=1), as kaiko's eva reports its probes. A probe on frozen "
            "features is its own row (model [probe=linear]). The SD measures how much the result moves with the "
            "split and the initialisation; the per-run intervals in the other sections measure the test patients' "
            "sampling instead."
        ),
        Table(shown, "Mean ± standard deviation over seeds (or folds) of each metric."),
    ]


def has_several_seeds(study: StudyFiles) -> bool:
    """Whether any cell of the study has more than one seed or fold."""
    return bool(len(study.summary)) and int(study.summary["n_seeds"].max()) > 1


SECTION = ReportSection("seeds", "Mean ± SD over seeds", build, needs_results=True, applies=has_several_seeds)
