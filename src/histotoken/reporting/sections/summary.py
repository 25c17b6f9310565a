"""Report section "Summary": the study's questions, each answered in one sentence with its number and interval.

The answers come from the same files and the same paired statistics as the tables further down
(:class:`histotoken.reporting.comparisons.StudyPredictions`, shared through the section context, so
a difference quoted here is the one the "Statistics" section shows). A sentence states a direction
("is ahead", "loses") only when the 95% interval of the difference excludes 0
(:func:`histotoken.stats.is_resolved`); otherwise it says the difference is not resolved.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from histotoken.reporting import tables
from histotoken.reporting.blocks import Bullets, Note, Paragraph
from histotoken.reporting.formatting import MISSING, format_estimate, format_number
from histotoken.reporting.sections.context import ReportSection, SectionContext
from histotoken.reporting.sections.statistics import HEADLINE, UNRESOLVED, format_difference, reference_model
from histotoken.stats import is_resolved

METRIC = "macro-F1"


def build(context: SectionContext) -> list:
    study = context.study
    items: list[str] = []
    for task in study.tasks:
        prefix = f"Task {task}: " if context.multiple_tasks else ""
        summary = study.summary[(study.summary["task"] == task) & (study.summary["metric"] == HEADLINE)]
        items += [prefix + sentence for sentence in best_model_sentences(context, summary, task)]
        if context.words.has_magnification:
            items += [prefix + sentence for sentence in cross_magnification_sentences(context, summary, task)]
            items += [prefix + sentence for sentence in mixed_training_sentences(context, task)]
        items += [prefix + sentence for sentence in token_efficiency_sentences(context, summary, task)]
    items += cost_sentences(context)
    blocks: list = [Paragraph(
        f"The study's questions, each answered from the tables below ({METRIC} on held-out patients, 95% "
        "intervals from resampling whole test patients; differences are paired over the same test images). "
        f"A direction is stated only where the interval of the difference excludes 0; otherwise the "
        f"difference is {UNRESOLVED}."
    )]
    blocks.append(Bullets(items) if items else Note("No result rows to summarise."))
    blocks.append(Paragraph(what_was_run(context)))
    return blocks


def _domain_rows(summary: pd.DataFrame, train_domain: str, test_domain: str) -> pd.DataFrame:
    rows = summary[(summary["train_domain"] == train_domain) & (summary["test_domain"] == test_domain)]
    return rows.dropna(subset=["value"]).sort_values("value", ascending=False, kind="stable")


def _estimate(row) -> str:
    return format_estimate(float(row["value"]), float(row["ci_low"]), float(row["ci_high"]))


def _paired(context: SectionContext, a: tuple[str, str, str], b: tuple[str, str, str], task: str,
            same_images: bool = True):
    found = context.predictions().compare(a, b, task, same_images=same_images)
    return None if not found else found[HEADLINE]


def _magnitude(difference) -> str:
    """``0.206 [0.015, 0.373]``: the size of a resolved difference, without its sign."""
    values = sorted(abs(v) for v in (difference.low, difference.high))
    return f"{abs(difference.difference):.3f} [{values[0]:.3f}, {values[1]:.3f}]"


def _verdict(difference) -> str:
    return format_difference(difference.difference, difference.low, difference.high)


def best_model_sentences(context: SectionContext, summary: pd.DataFrame, task: str) -> list[str]:
    """Per in-domain test domain: the model with the highest macro-F1 and its lead over the next one."""
    sentences = []
    in_domain = summary[summary["train_domain"] == summary["test_domain"]]
    for domain in tables.sort_domains(in_domain["test_domain"]):
        ranked = _domain_rows(summary, domain, domain)
        if ranked.empty:
            continue
        best = ranked.iloc[0]
        where = f"Trained and tested on {domain}"
        if len(ranked) == 1:
            sentences.append(f"{where}: only {best['model']} was evaluated ({METRIC} {_estimate(best)}).")
            continue
        runner_up = ranked.iloc[1]
        difference = _paired(context, (best["model"], domain, domain), (runner_up["model"], domain, domain), task)
        if difference is None:
            sentences.append(f"{where}: {best['model']} has the highest {METRIC}, {_estimate(best)}, then "
                             f"{runner_up['model']} ({_estimate(runner_up)}); no per-image predictions to pair "
                             "them, so the lead is not tested.")
        elif is_resolved(difference.low, difference.high):
            sentences.append(f"{where}: {best['model']} is best, {METRIC} {_estimate(best)}, ahead of "
                             f"{runner_up['model']} by {_verdict(difference)}.")
        else:
            sentences.append(f"{where}: {best['model']} has the highest {METRIC}, {_estimate(best)}, but its lead "
                             f"over {runner_up['model']} ({_verdict(difference)}) is {UNRESOLVED}.")
    return sentences


def cross_magnification_sentences(context: SectionContext, summary: pd.DataFrame, task: str) -> list[str]:
    """Per model: the largest in-domain minus cross-magnification difference on one test magnification."""
    sentences = []
    singles = [d for d in tables.sort_domains(summary["train_domain"]) if tables.is_single_magnification(d)]
    for model in tables.ordered_unique(summary["model"]):
        drops = []
        for test in singles:
            for train in singles:
                if train == test:
                    continue
                difference = _paired(context, (model, test, test), (model, train, test), task)
                if difference is not None and not np.isnan(difference.difference):
                    drops.append((difference, train, test))
        if not drops:
            continue
        difference, train, test = max(drops, key=lambda found: found[0].difference)
        n_resolved = sum(is_resolved(d.low, d.high) and d.difference > 0 for d, _, _ in drops)
        count = f"{n_resolved} of {len(drops)} such drops resolved"
        if is_resolved(difference.low, difference.high):
            verb = "loses" if difference.difference > 0 else "gains"
            size = _magnitude(difference)
            sentences.append(f"Cross-magnification: {model} {verb} {size} {METRIC} on {test} when "
                             f"trained on {train} instead of {test} (its largest drop; {count}).")
        else:
            sentences.append(f"Cross-magnification: for {model} the largest drop, on {test} when trained on {train} "
                             f"instead of {test}, is {_verdict(difference)}: {UNRESOLVED} ({count}).")
    return sentences


def mixed_training_sentences(context: SectionContext, task: str) -> list[str]:
    """Per model: the gain of training on a mixed magnification set over the test magnification alone."""
    from histotoken.reporting import comparisons

    table = comparisons.mixed_gain_differences(context.predictions(), task)
    if table.empty:
        return []
    sentences = []
    headline = table[table["metric"] == HEADLINE]
    for model in tables.ordered_unique(headline["model"]):
        parts = []
        for row in headline[headline["model"] == model].to_dict("records"):
            verdict = ("resolved gain" if row["difference"] > 0 else "resolved loss") \
                if is_resolved(row["low"], row["high"]) else UNRESOLVED
            parts.append(f"{format_difference(row['difference'], row['low'], row['high'])} on {row['test_domain']} "
                         f"({verdict})")
        mixed = ", ".join(tables.ordered_unique(headline[headline["model"] == model]["mixed_domain"]))
        sentences.append(f"Mixed-magnification training: {model} trained on {mixed} instead of on the test "
                         f"magnification alone: {'; '.join(parts)}.")
    return sentences


def _efficiency(context: SectionContext) -> pd.DataFrame | None:
    efficiency = context.study.efficiency
    if efficiency is None or "model" not in efficiency.columns:
        return None
    return efficiency.drop_duplicates("model", keep="last").set_index("model")


def cost_sentences(context: SectionContext) -> list[str]:
    """Each model's measured cost as a multiple of the reference model's (no interval: one measurement)."""
    efficiency = _efficiency(context)
    reference = reference_model(context)
    if efficiency is None:
        return ["Cost: efficiency.csv is missing, so no model's cost is known (run `histotoken benchmark`)."]
    if reference not in efficiency.index:
        return [f"Cost: the reference model {reference} has no row in efficiency.csv."]
    parts = []
    for model in context.study.models:
        if model == reference or model not in efficiency.index:
            continue
        ratios = []
        for column, name in (("gflops", "the GFLOPs"), ("throughput_img_s", "the throughput"),
                             ("latency_ms_median", "the latency")):
            if column in efficiency.columns:
                ours, theirs = efficiency.at[model, column], efficiency.at[reference, column]
                if pd.notna(ours) and pd.notna(theirs) and float(theirs) > 0:
                    ratios.append(f"{float(ours) / float(theirs):.2f}x {name}")
        if ratios:
            parts.append(f"{model} {', '.join(ratios)}")
    if not parts:
        return []
    return [f"Cost relative to {reference} (the reference model; measured once, no interval): "
            + "; ".join(parts) + "."]


def token_efficiency_sentences(context: SectionContext, summary: pd.DataFrame, task: str) -> list[str]:
    """Models with fewer tokens at the head than the densest transformer: speed-up and accuracy kept."""
    efficiency = _efficiency(context)
    if efficiency is None or not {"tokens_final", "throughput_img_s"} <= set(efficiency.columns):
        return []
    tokens = pd.to_numeric(efficiency["tokens_final"], errors="coerce")
    models = [m for m in tables.ordered_unique(summary["model"]) if m in tokens.index and pd.notna(tokens[m])]
    if len(models) < 2:
        return []
    dense = max(models, key=lambda m: tokens[m])
    sentences = []
    for model in models:
        if tokens[model] >= tokens[dense]:
            continue
        speed = float(efficiency.at[model, "throughput_img_s"]) / float(efficiency.at[dense, "throughput_img_s"])
        parts, losses, gains = [], [], []
        in_domain = summary[(summary["model"] == model) & (summary["train_domain"] == summary["test_domain"])]
        for domain in tables.sort_domains(in_domain["test_domain"]):
            difference = _paired(context, (model, domain, domain), (dense, domain, domain), task)
            if difference is None:
                continue
            parts.append(f"{_verdict(difference)} on {domain}")
            if is_resolved(difference.low, difference.high):
                (losses if difference.difference < 0 else gains).append(domain)
        head = (f"Token efficiency: {model} ({int(tokens[model])} tokens at the head against {int(tokens[dense])}) "
                f"runs at {speed:.2f}x the throughput of {dense}")
        if not parts:
            sentences.append(head + "; no paired predictions to compare their accuracy.")
            continue
        if losses:
            verdict = f"it loses accuracy on {', '.join(losses)}"
        elif gains:
            verdict = f"it is more accurate on {', '.join(gains)} and no loss is resolved"
        else:
            verdict = "no loss is resolved at this sample size (the intervals bound how much it may lose)"
        sentences.append(f"{head}; {METRIC} difference {'; '.join(parts)}: {verdict}.")
    return sentences


def what_was_run(context: SectionContext) -> str:
    """One line: models, domains, seeds, runs and data."""
    study = context.study
    seeds = tables.ordered_unique(study.results["seed"])
    text = (f"What was run: {len(study.models)} model(s) ({', '.join(study.models)}); train domain(s) "
            f"{', '.join(tables.sort_domains(study.summary['train_domain'])) or MISSING}, test domain(s) "
            f"{', '.join(tables.sort_domains(study.summary['test_domain'])) or MISSING}; {len(seeds)} seed(s) or fold(s)")
    if study.runs is not None and "status" in study.runs.columns:
        counts = study.runs["status"].fillna("unknown").value_counts()
        text += "; runs: " + ", ".join(f"{n} {status}" for status, n in counts.items())
    dataset = study.dataset or {}
    if dataset:
        origin = "synthetic" if dataset.get("synthetic") else "real"
        groups = "" if context.words.groups == "images" else \
            f" from {format_number(dataset.get('n_patients'), 0)} patients"
        text += f"; data: {format_number(dataset.get('n_images'), 0)} {origin} images{groups}"
    return text + ". Details in \"What was run\"; examples of the images just below."


SECTION = ReportSection("summary", "Summary", build, needs_results=True)
