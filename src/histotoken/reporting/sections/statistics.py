"""Report section "Statistics": seeds pooled properly, and paired comparisons with intervals.

Reads each run's ``eval/<domain>.predictions.csv`` (:mod:`histotoken.reporting.comparisons`). A
verdict that names the side ahead appears only when the 95% interval of the difference excludes zero;
otherwise it says the difference is not resolved at this sample size. One table per comparison, with
its caption above it; no repeated sentences.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from histotoken.reporting import comparisons
from histotoken.reporting import statistics as st
from histotoken.reporting.blocks import Details, Heading, Note, Paragraph, Table
from histotoken.reporting.formatting import MISSING, format_number
from histotoken.reporting.sections.context import ReportSection, SectionContext
from histotoken.reporting.tables import METRIC_LABELS, domain_sort_key

HEADLINE = "macro_f1"
METRIC_ORDER = ("macro_f1", "balanced_accuracy", "accuracy")

INTRO = (
    "Three kinds of intervals, each 95% and each from resampling whole test patients (images of one "
    "patient are correlated): (1) one run on one test domain: the evaluation's own patient bootstrap "
    "(earlier sections); (2) across seeds or folds: the mean and standard deviation of the per-seed "
    "values, and a pooled interval from a stratified bootstrap (patients resampled within each seed or "
    "fold, each one's metric recomputed, then averaged); (3) paired comparisons of A and B on the same "
    "test patients: the same resampled patients for both, so that what A and B share cancels; the "
    "difference A - B, its interval and the share of resamples in which A is ahead. For accuracy on "
    "the same images, McNemar's exact test on the images one side got right and the other wrong. "
    "A sentence below says that one side is better only when the interval of the difference excludes 0."
)
UNRESOLVED = "not resolved at this sample size"


def signed(value: float, digits: int = 3) -> str:
    return MISSING if value is None or np.isnan(value) else f"{value:+.{digits}f}"


def format_difference(difference: float, low: float, high: float) -> str:
    """``+0.031 [-0.012, +0.071]``."""
    if np.isnan(difference):
        return MISSING
    return f"{signed(difference)} [{signed(low)}, {signed(high)}]"


def claim(a: str, b: str, metric: str, row: dict, where: str) -> str:
    """One sentence on A - B: a direction only when the interval excludes 0."""
    label = METRIC_LABELS.get(metric, metric)
    numbers = f"{label} {signed(row['difference'])}, 95% interval {signed(row['low'])} to {signed(row['high'])}"
    if st.is_resolved(row["low"], row["high"]):
        better, worse = (a, b) if row["difference"] > 0 else (b, a)
        return f"{better} is better than {worse} {where} ({numbers})."
    return f"{where[0].upper() + where[1:]}, the difference between {a} and {b} is {UNRESOLVED} ({numbers})."


def build(context: SectionContext) -> list:
    study = context.study
    data = context.predictions()
    blocks: list = [Paragraph(INTRO), *st.notes_blocks(study)]  # what the evaluations cannot support
    if not any(data.folds(*key, test) for key in data.runs for test in set(study.summary["test_domain"])):
        return blocks + [Note(
            "No run folder holds per-image predictions (eval/<domain>.predictions.csv): paired comparisons "
            "and pooled intervals need them. Re-run `histotoken evaluate` on the runs to write them."
        )]
    reference = reference_model(context)
    for task in study.tasks:
        context.task_heading(task, blocks)
        blocks += _pooled_blocks(context, data, task)
        blocks += _reference_blocks(context, data, task, reference)
        if context.words.has_magnification:  # cross-magnification comparisons need magnifications
            blocks += _asymmetry_blocks(context, data, task)
            blocks += _mixed_blocks(context, data, task)
    return blocks


def reference_model(context: SectionContext) -> str:
    """The spec's ``reference_model:`` (a model label), or else the first model of the study."""
    chosen = (context.study.spec or {}).get("reference_model")
    models = context.study.models
    return str(chosen) if chosen and str(chosen) in models else models[0]


def _pooled_blocks(context: SectionContext, data, task: str) -> list:
    blocks: list = [Heading("Across seeds and folds", level=context.sub_level)]
    pooled = comparisons.pooled_table(data, task)
    if pooled.empty:
        return blocks + [Note("No predictions files for this task.")]
    if int(pooled["n_seeds"].max()) < 2:
        return blocks + [Note(
            "One seed (or fold) per cell: the intervals in the tables above are each run's own patient "
            "bootstrap; there is no spread over seeds to show."
        )]
    rows = pooled[pooled["metric"] == HEADLINE]
    shown = pd.DataFrame({
        "model": [context.label(m, task) for m in rows["model"]],
        "train": rows["train_domain"], "test": rows["test_domain"],
        "seeds": rows["n_seeds"].astype(str),
        "mean macro-F1": [format_number(v, 3) for v in rows["mean"]],
        "SD over seeds": [format_number(v, 3) for v in rows["sd"]],
        "pooled 95% interval": [f"[{lo:.3f}, {hi:.3f}]" for lo, hi in zip(rows["low"], rows["high"])],
    })
    blocks.append(Table(shown, "Mean and standard deviation (ddof=1) of the per-seed macro-F1, and the "
                               "stratified-bootstrap interval of the mean (patients resampled within each "
                               "seed/fold)."))
    outside = (rows["mean"] < rows["low"]) | (rows["mean"] > rows["high"])
    if outside.any():
        blocks.append(Note(
            f"{int(outside.sum())} interval(s) do not contain their mean: some class has a single test patient, "
            "so whole classes drop out of resamples and macro-F1 falls in them. Read these intervals as a "
            "lower bound on the uncertainty; more test patients per class fix it."
        ))
    return blocks


def verdict(a: str, b: str, row: dict) -> str:
    """The verdict column: who is ahead where the interval excludes 0, else "not resolved"."""
    if np.isnan(row["difference"]) or not st.is_resolved(row["low"], row["high"]):
        return UNRESOLVED
    return f"{a} ahead" if row["difference"] > 0 else f"{b} ahead"


def mcnemar_text(p_value: float) -> str:
    return MISSING if p_value is None or np.isnan(p_value) else f"{p_value:.3f}"


def _reference_blocks(context: SectionContext, data, task: str, reference: str) -> list:
    blocks: list = [Heading(f"Paired differences against {reference}", level=context.sub_level)]
    table = comparisons.reference_differences(data, reference, task)
    if table.empty:
        return blocks + [Note(f"No other model shares test predictions with the reference model {reference}.")]
    blocks.append(Paragraph(
        f"One table per model: each row is one train x test cell, macro-F1 of the model minus that of "
        f"{reference} (the reference model; set `reference_model:` in the study file to choose another) on the "
        "same test images, with its 95% paired-bootstrap interval, and McNemar's exact test on accuracy. "
        f"Verdict: who is ahead, only where the interval excludes 0; otherwise {UNRESOLVED}."
    ))
    headline = table[table["metric"] == HEADLINE]
    accuracy = table[table["metric"] == "accuracy"].set_index(["model", "train_domain", "test_domain"])
    for model in dict.fromkeys(headline["model"]):
        rows = headline[headline["model"] == model].to_dict("records")
        p_values = [accuracy["mcnemar_p"].get((model, r["train_domain"], r["test_domain"]), np.nan) for r in rows]
        shown = pd.DataFrame({
            "trained on": [r["train_domain"] for r in rows],
            "tested on": [r["test_domain"] for r in rows],
            "F1 model": [format_number(r["a"], 3) for r in rows],
            "F1 reference": [format_number(r["b"], 3) for r in rows],
            "difference [95% interval]": [format_difference(r["difference"], r["low"], r["high"]) for r in rows],
            "resamples ahead": [f"{r['share_a_better']:.0%}" for r in rows],
            "McNemar p (accuracy)": [mcnemar_text(p) for p in p_values],
            "verdict": [verdict("model", "reference", r) for r in rows],
        })
        blocks.append(Table(shown, f"{context.label(model, task)} minus {reference}: macro-F1 difference "
                                   "per train x test cell"))
    blocks.append(Details("All metrics, share of resamples ahead and McNemar's test",
                          [Table(_detail_table(table, ["model", "train_domain", "test_domain"]))]))
    return blocks


def _asymmetry_blocks(context: SectionContext, data, task: str) -> list:
    blocks: list = [Heading("Cross-magnification asymmetry, with intervals", level=context.sub_level)]
    table = comparisons.asymmetry_differences(data, task)
    if table.empty:
        return blocks + [Note("Needs two single magnifications each used for training and for testing, with "
                              "predictions files.")]
    headline = table[table["metric"] == HEADLINE]
    shown = pd.DataFrame({
        "model": [context.label(m, task) for m in headline["model"]],
        "A": [f"train {h} -> test {lo}" for lo, h in zip(headline["low_domain"], headline["high_domain"])],
        "B": [f"train {lo} -> test {h}" for lo, h in zip(headline["low_domain"], headline["high_domain"])],
        "F1 A": [format_number(v, 3) for v in headline["a"]],
        "F1 B": [format_number(v, 3) for v in headline["b"]],
        "A - B [95% interval]": [format_difference(d, lo, hi) for d, lo, hi in
                                 zip(headline["difference"], headline["low"], headline["high"])],
        "resamples A ahead": [f"{v:.0%}" for v in headline["share_a_better"]],
        "verdict": [verdict("A", "B", row) for row in headline.to_dict("records")],
    })
    blocks.append(Table(shown, "Transfer down (A: higher to lower magnification) against transfer up (B), per "
                               "model"))
    return blocks + [Paragraph("Paired over the same test patients (their images at the two magnifications): "
                               "positive means the model transfers better from the higher magnification down "
                               "than from the lower one up.")]


def _mixed_blocks(context: SectionContext, data, task: str) -> list:
    blocks: list = [Heading("Mixed-magnification training gain, with intervals", level=context.sub_level)]
    table = comparisons.mixed_gain_differences(data, task)
    if table.empty:
        return blocks + [Note("Needs a mixed train domain (such as 100+400) and its single magnifications "
                              "trained on alone, with predictions files.")]
    headline = table[table["metric"] == HEADLINE]
    shown = pd.DataFrame({
        "model": [context.label(m, task) for m in headline["model"]],
        "trained on": headline["mixed_domain"],
        "test": headline["test_domain"],
        "F1 mixed": [format_number(v, 3) for v in headline["a"]],
        "F1 test magnification alone": [format_number(v, 3) for v in headline["b"]],
        "gain [95% interval]": [format_difference(d, lo, hi) for d, lo, hi in
                                zip(headline["difference"], headline["low"], headline["high"])],
        "resamples mixed ahead": [f"{v:.0%}" for v in headline["share_a_better"]],
        "McNemar p (accuracy)": [mcnemar_text(v) for v in table[table["metric"] == "accuracy"]["mcnemar_p"]],
        "verdict": [verdict("mixed", "single", row) for row in headline.to_dict("records")],
    })
    blocks.append(Table(shown, "Mixed-magnification training against the test magnification alone, per model"))
    return blocks + [Paragraph("Gain = macro-F1 of the run trained on the mixed domain minus that of the run "
                               "trained on the test magnification alone (the in-domain specialist), on the "
                               "same test images.")]


def _detail_table(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    order = {metric: rank for rank, metric in enumerate(METRIC_ORDER)}
    ranks = {f"_{key}": [domain_sort_key(v) if key.endswith("domain") else v for v in table[key]] for key in keys}
    rows = table.assign(rank=table["metric"].map(order), **ranks)
    positions = sorted(range(len(rows)), key=lambda i: (*(rows[f"_{k}"].iloc[i] for k in keys), rows["rank"].iloc[i]))
    rows = rows.iloc[positions]
    shown = pd.DataFrame({key.replace("_", " "): rows[key] for key in keys})
    shown["metric"] = [METRIC_LABELS.get(m, m) for m in rows["metric"]]
    shown["A - B [95% interval]"] = [format_difference(d, lo, hi) for d, lo, hi in
                                     zip(rows["difference"], rows["low"], rows["high"])]
    shown["resamples A ahead"] = [f"{v:.0%}" for v in rows["share_a_better"]]
    shown["McNemar p"] = [format_number(v, 3) for v in rows["mcnemar_p"]]
    shown["seeds"] = rows["n_folds"].astype(str)
    shown["verdict"] = [verdict("A", "B", row) for row in rows.to_dict("records")]
    return shown.reset_index(drop=True)


SECTION = ReportSection("statistics", "Statistics", build, needs_results=True)
