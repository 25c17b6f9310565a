"""Report section "Cross-magnification generalisation": train x test matrices, asymmetry and mixed training."""

from __future__ import annotations

import numpy as np
import pandas as pd

from histotoken.reporting import plots, tables
from histotoken.reporting.blocks import Heading, Note, Paragraph, Table
from histotoken.reporting.formatting import MISSING, file_name, format_number, matrix_table
from histotoken.reporting.sections.context import ReportSection, SectionContext, has_magnifications


def build(context: SectionContext) -> list:
    blocks: list = [Paragraph(
        "Macro-F1 of every model trained on one magnification (row) and tested on another (column). "
        "The diagonal is in-domain; everything off it measures how well a model survives a change of "
        "magnification. Values are averaged over seeds."
    )]
    for task in context.study.tasks:
        context.task_heading(task, blocks)
        blocks += _cross_domain_for_task(context, task)
    return blocks

def _cross_domain_for_task(context: SectionContext, task: str) -> list:
    summary = context.study.summary[context.study.summary["task"] == task]
    blocks: list = []
    matrices = {}
    for model, _ in tables.model_task_pairs(summary):
        matrix = tables.cross_domain_matrix(summary, model, task)
        matrices[context.label(model, task)] = matrix
        blocks.append(Heading(f"Macro-F1 matrix: {context.label(model, task)}", level=context.sub_level))
        blocks.append(Table(matrix_table(matrix)))
    if any(matrix.size > 1 for matrix in matrices.values()):
        blocks.append(context.figure(
            f"cross_domain_heatmap_{file_name(task)}",
            plots.cross_domain_heatmaps(matrices),
            "Cross-magnification macro-F1 per model.",
            "Each cell is the macro-F1 on the column's test magnification of the model trained on the "
            "row's; compare each cell with its row's diagonal cell: the darker it is, the more the model "
            "lost by changing magnification.",
        ))
    else:
        blocks.append(Note("Every model has a single train/test cell: no heatmap is drawn."))

    cross = tables.cross_domain_summary(summary)
    blocks.append(Heading("In-domain versus cross-domain", level=context.sub_level))
    shown = pd.DataFrame({
        "model": [context.label(m, t) for m, t in zip(cross["model"], cross["task"])],
        "in-domain mean": [format_number(v, 3) for v in cross["in_domain_mean"]],
        "cross-domain mean (off-diagonal)": [format_number(v, 3) for v in cross["cross_domain_mean"]],
        "unseen-magnification mean": [format_number(v, 3) for v in cross["unseen_mean"]],
        "drop (in - cross)": [format_number(v, 3) for v in cross["drop"]],
    })
    blocks.append(Table(shown, "Cross-domain mean = mean of all off-diagonal cells; unseen-magnification "
                               "mean keeps only cells whose test magnification was not in training "
                               "(e.g. 100 -> 400 but not 100+400 -> 100)."))
    if cross["cross_domain_mean"].notna().any():
        blocks.append(context.figure(
            f"in_vs_cross_domain_{file_name(task)}",
            plots.in_vs_cross_bars(cross, list(shown["model"])),
            "Mean in-domain versus mean cross-domain macro-F1 per model.",
            "For each model the blue bar averages the diagonal of its matrix and the orange bar the "
            "off-diagonal cells; the gap between them is what a change of magnification costs.",
        ))
    else:
        blocks.append(Note("No run was tested on a magnification other than its own: "
                           "no cross-domain bars are drawn."))
    blocks += _asymmetry_blocks(context, summary)
    blocks += _mixed_blocks(context, summary)
    return blocks

def _asymmetry_blocks(context: SectionContext, summary: pd.DataFrame) -> list:
    blocks: list = [Heading("Directional asymmetry", level=context.sub_level)]
    asymmetry = tables.asymmetry_table(summary)
    if asymmetry.empty:
        return blocks + [Note("Needs two single magnifications each used both for training and for "
                              "testing (e.g. 100 and 400); this study has none.")]
    shown = pd.DataFrame({
        "model": [context.label(m, t) for m, t in zip(asymmetry["model"], asymmetry["task"])],
        "low -> high": [f"{a} -> {b}" for a, b in zip(asymmetry["low"], asymmetry["high"])],
        "F1 low -> high": [format_number(v, 3) for v in asymmetry["low_to_high"]],
        "high -> low": [f"{b} -> {a}" for a, b in zip(asymmetry["low"], asymmetry["high"])],
        "F1 high -> low": [format_number(v, 3) for v in asymmetry["high_to_low"]],
        "difference": [f"{v:+.3f}" for v in asymmetry["difference"]],
    })
    return blocks + [Table(shown, "Difference = F1(low -> high) - F1(high -> low); positive means the "
                                  "model transfers better from the lower to the higher magnification.")]

def _mixed_blocks(context: SectionContext, summary: pd.DataFrame) -> list:
    blocks: list = [Heading("Training on mixed magnifications", level=context.sub_level)]
    mixed = tables.mixed_training_table(summary)
    if mixed.empty:
        return blocks + [Note("No mixed train domain (such as 100+400) in this study.")]
    single_columns = [c for c in mixed.columns if c.startswith("train ")]
    shown = pd.DataFrame({
        "model": [context.label(m, t) for m, t in zip(mixed["model"], mixed["task"])],
        "mixed train domain": mixed["mixed_domain"],
        "test domain": mixed["test_domain"],
        "F1 mixed": [format_number(v, 3) for v in mixed["mixed"]],
    })
    for column in single_columns:
        shown[f"F1 {column}"] = [format_number(v, 3) for v in mixed[column]]
    shown["mixed - best single"] = [MISSING if np.isnan(v) else f"{v:+.3f}" for v in mixed["mixed_minus_best"]]
    return blocks + [Table(shown, "Each mixed-magnification run next to the single-magnification runs of "
                                  "the same model on the same test domain.")]




SECTION = ReportSection("cross_domain", "Cross-magnification generalisation", build, needs_results=True,
                        applies=has_magnifications)
