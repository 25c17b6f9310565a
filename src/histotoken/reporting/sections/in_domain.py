"""Report section "In-domain performance and cost": each model on its own magnification, with its cost."""

from __future__ import annotations

import pandas as pd

from histotoken.reporting import statistics, tables
from histotoken.reporting.blocks import Note, Paragraph, Table
from histotoken.reporting.formatting import format_efficiency, format_estimate
from histotoken.reporting.sections.context import ReportSection, SectionContext


def build(context: SectionContext) -> list:
    study = context.study
    blocks: list = [Paragraph(
        "Each row of the first table is one model trained and tested on the same magnification (in-domain), on the "
        "held-out patients of the test split. Each value is followed by its 95% interval as the evaluation "
        "wrote it (a bootstrap over test patients; the value alone where the file has no interval). With "
        "several seeds or folds, the value is their mean and no interval is shown here (averaged interval "
        "bounds are not an interval); section \"Statistics\" gives their standard deviation and a pooled "
        "interval. Patient-level accuracy "
        "is the BreakHis patient recognition rate: the mean over test patients of the fraction of their "
        "images classified correctly."
    )]
    table = tables.in_domain_table(study.summary)
    if table.empty:
        return blocks + [Note("results.csv has no in-domain rows (test domain = train domain).")]
    shown = pd.DataFrame({"model": table["model"]})
    if context.multiple_tasks:
        shown["task"] = table["task"]
    shown["train = test"] = table["train_domain"]
    shown["seeds"] = table["n_seeds"].astype(str)
    for metric in tables.METRICS:
        shown[tables.METRIC_LABELS[metric]] = [
            format_estimate(v, lo, hi)
            for v, lo, hi in zip(table[metric], table[f"{metric}_low"], table[f"{metric}_high"])
        ]
    blocks.append(Table(shown, "Each model on the test split of the magnification it was trained on: value "
                               "[95% interval]"))
    blocks += statistics.notes_blocks(study, in_domain_only=True)  # few test patients, degenerate intervals
    if study.efficiency is not None:  # cost is the model's, whatever it was trained on: one row per model
        models = pd.DataFrame({"model": list(dict.fromkeys(table["model"]))})
        cost = tables.join_efficiency(models, study.efficiency)
        blocks.append(Table(pd.concat([cost[["model"]], format_efficiency(cost)], axis=1),
                            "Cost of each model, measured once per model"))
    if study.efficiency is None:
        blocks.append(Note("efficiency.csv is missing: latency, throughput, memory, parameters, GFLOPs and "
                           "tokens are not shown. Run `histotoken benchmark` for the study's models and save "
                           "it as efficiency.csv in the study folder."))
    else:
        blocks.append(Paragraph(_benchmark_conditions(context)))
    return blocks

def _benchmark_conditions(context: SectionContext) -> str:
    efficiency = context.study.efficiency
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




SECTION = ReportSection("in_domain", "In-domain performance and cost", build, needs_results=True)
