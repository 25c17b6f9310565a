"""Report section "Accuracy versus cost": in-domain macro-F1 against measured cost, with Pareto fronts."""

from __future__ import annotations

import pandas as pd

from histotoken.reporting import plots, tables
from histotoken.reporting.blocks import Note, Paragraph, Table
from histotoken.reporting.formatting import file_name, format_number
from histotoken.reporting.sections.context import ReportSection, SectionContext


def build(context: SectionContext) -> list:
    efficiency = context.study.efficiency
    blocks: list = [Paragraph(
        "In-domain macro-F1 (averaged over train magnifications and seeds) against measured cost. A model "
        "is on the Pareto front when no other model is at least as accurate and at least as cheap, and "
        "strictly better on one of the two."
    )]
    if efficiency is None:
        return blocks + [Note("efficiency.csv is missing: accuracy cannot be set against cost. Run "
                              "`histotoken benchmark` for the study's models and save it as efficiency.csv.")]
    for task in context.study.tasks:
        context.task_heading(task, blocks)
        table = tables.accuracy_cost_table(context.study.summary, efficiency, task)
        yes_no = {True: "yes", False: "no"}
        blocks.append(Table(pd.DataFrame({
            "model": table["model"],
            "in-domain macro-F1": [format_number(v, 3) for v in table["macro_f1"]],
            "throughput (img/s)": [format_number(v) for v in table["throughput_img_s"]],
            "GFLOPs": [format_number(v) for v in table["gflops"]],
            "Pareto: F1 vs throughput": table["pareto_throughput"].map(yes_no),
            "Pareto: F1 vs GFLOPs": table["pareto_gflops"].map(yes_no),
        })))
        suffix = file_name(task)
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
            blocks.append(context.figure(
                f"f1_vs_{column}_{suffix}",
                plots.pareto_scatter(table, column, label, front, lower_x_is_better=lower),
                f"In-domain macro-F1 versus {label}.",
                f"Each point is one model; red diamonds joined by the dashed line are the Pareto front "
                f"({how}); up and to the {'left' if lower else 'right'} is better.",
            ))
    return blocks




SECTION = ReportSection("cost", "Accuracy versus cost", build, needs_results=True)
