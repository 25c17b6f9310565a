"""The slide study report: what ``histotoken slides demo --out DIR`` measured, from its files alone.

Reads DIR/slides_study.json (the configuration), DIR/steps.json (seconds per step), DIR/cohort/cohort.json
(each slide's stage and deposits), DIR/features/manifest.json (the backbone and its weights) and, per
aggregator, DIR/runs/<id>/{config.json, eval.json, predictions.csv, heatmaps/<slide>.png}; writes
DIR/report.html (self-contained), DIR/report.md and DIR/figures/. Every sentence that compares
aggregators is built from the measured numbers.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histotoken import formats
from histotoken.io import read_json
from histotoken.reporting.blocks import FigureBlock, Note, Paragraph, Section, Table
from histotoken.reporting.formatting import file_name, format_estimate, format_number
from histotoken.reporting.render import write_report

logger = logging.getLogger(__name__)

STAGE_ORDER = ("macro", "micro", "itc", "negative")
STAGE_WORDS = {"macro": "macro (> 2 mm)", "micro": "micro (0.2-2 mm)", "itc": "ITC-like (< 0.2 mm)",
               "negative": "normal"}
BANNER = ("SYNTHETIC DATA: the slides are drawn by histotoken (flat-colour lymph-node-like sections) and the tile "
          "features come from the backbone named below. No number here says anything about real tissue.")
HEATMAP_AGGREGATORS = ("max", "abmil")  # shown side by side for the test tumour slides
# The slide study folder (``histotoken slides demo --out DIR``), written by experiments/slides_demo.py.
CONFIG_NAME = "slides_demo.yaml"
COHORT_DIR, TILES_DIR, FEATURES_DIR, RUNS_DIR = "cohort", "tiles", "features", "runs"
STEPS_FILE = "steps.json"  # seconds per step
STUDY_FILE = "slides_study.json"  # the configuration the folder was run with


def _scalar(text: str) -> Any:
    """``16`` -> 16, ``0.5`` -> 0.5, ``true`` -> True, anything else stays text (as YAML reads a scalar)."""
    import yaml

    return yaml.safe_load(text)


@dataclasses.dataclass(frozen=True)
class AggregatorSpec:
    """``NAME:k=v,...`` as written in the config; ``label`` (``NAME@k=v``) in tables, ``run_id`` (``NAME-k-v``)."""

    name: str
    kwargs: dict[str, Any]

    @classmethod
    def parse(cls, text: str) -> AggregatorSpec:
        name, _, rest = str(text).partition(":")
        kwargs: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"{CONFIG_NAME}: aggregator {text!r}: options are NAME:key=value,... (e.g. topk:k=16)")
            kwargs[key.strip()] = _scalar(value)
        return cls(name.strip(), kwargs)

    @property
    def label(self) -> str:
        return self.name + "".join(f"@{k}={v}" for k, v in self.kwargs.items())

    @property
    def run_id(self) -> str:
        return self.name + "".join(f"-{k}-{v}" for k, v in self.kwargs.items())




def _runs(out: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per aggregator of the configuration that has a finished run."""
    runs = []
    for text in config["aggregators"]:
        spec = AggregatorSpec.parse(text)
        run_dir = out / RUNS_DIR / spec.run_id
        if not (run_dir / "eval.json").is_file():
            logger.warning("%s: no eval.json; %s is left out of the report", run_dir, spec.label)
            continue
        predictions = pd.read_csv(run_dir / "predictions.csv", dtype={"slide": str, "patient_id": str})
        runs.append({"spec": spec, "dir": run_dir, "eval": read_json(run_dir / "eval.json"),
                     "predictions": predictions})
    if not runs:
        raise FileNotFoundError(f"{out / RUNS_DIR}: no finished runs (eval.json); run `histotoken slides demo --out {out}`")
    return runs


def _interval(evaluation: dict[str, Any], name: str) -> tuple[float, float]:
    bounds = evaluation.get(f"{name}_ci95")
    return (float(bounds[0]), float(bounds[1])) if bounds else (float("nan"), float("nan"))


def _value(evaluation: dict[str, Any], name: str) -> float:
    value = evaluation.get(name)
    return float("nan") if value is None else float(value)


def results_frame(runs: list[dict[str, Any]]) -> pd.DataFrame:
    """Numbers per aggregator: AUROC and balanced accuracy with intervals, tokens, milliseconds, memory."""
    rows = []
    for run in runs:
        evaluation, cost = run["eval"], run["eval"]["cost"]
        auroc_low, auroc_high = _interval(evaluation, "auroc")
        bacc_low, bacc_high = _interval(evaluation, "balanced_accuracy")
        rows.append({"aggregator": run["spec"].label, "name": run["spec"].name,
                     "auroc": _value(evaluation, "auroc"), "auroc_low": auroc_low, "auroc_high": auroc_high,
                     "balanced_accuracy": _value(evaluation, "balanced_accuracy"), "bacc_low": bacc_low,
                     "bacc_high": bacc_high, "tokens_in": cost["tokens_in_mean"], "tokens_kept": cost["tokens_kept_mean"],
                     "ms_per_slide": cost["ms_per_slide_mean"], "peak_memory_mb": cost["peak_memory_mb_max"],
                     "n_slides": evaluation["n_slides"], "n_patients": evaluation["n_patients"]})
    return pd.DataFrame(rows)


def stage_calls(runs: list[dict[str, Any]], stages: dict[str, str]) -> pd.DataFrame:
    """Per aggregator and stage: test slides called tumour (probability >= 0.5) and their count."""
    rows = []
    for run in runs:
        table = run["predictions"].assign(stage=lambda t: t["slide"].map(stages))
        for stage in STAGE_ORDER:
            part = table[table["stage"] == stage]
            if len(part):
                rows.append({"aggregator": run["spec"].label, "stage": stage, "called_tumour": int(part["pred"].sum()),
                             "slides": len(part), "mean_probability": float(part["prob_tumor"].mean())})
    return pd.DataFrame(rows)


def accuracy_tokens_figure(results: pd.DataFrame):
    """AUROC and balanced accuracy (95% intervals as bars) against the tokens the aggregator kept per slide; one
    colour and marker per aggregator, named in the legend below (aggregators that keep every tile share an x)."""
    from histotoken.reporting.plots import new_figure

    markers = "osD^vP*Xh<>p"
    colours = [f"C{i % 10}" for i in range(len(results))]
    figure = new_figure(10.0, 4.6)
    axes = figure.subplots(1, 2, sharex=True)
    for axis, (metric, low, high, label) in zip(axes, (("auroc", "auroc_low", "auroc_high", "AUROC"),
                                                       ("balanced_accuracy", "bacc_low", "bacc_high",
                                                        "balanced accuracy"))):
        for index, (_, row) in enumerate(results.iterrows()):
            value = row[metric]
            if np.isnan(value):
                continue
            error = None if np.isnan(row[low]) else [[value - row[low]], [row[high] - value]]
            axis.errorbar(row["tokens_kept"], value, yerr=error, fmt=markers[index % len(markers)], capsize=3,
                          markersize=7, color=colours[index], markerfacecolor="none", markeredgewidth=1.5,
                          label=row["aggregator"])
        axis.set_xscale("log")
        axis.set_xlabel("tokens kept per slide (mean, log scale)")
        axis.set_ylabel(f"{label} (95% interval)")
        axis.set_ylim(-0.02, 1.05)
        axis.axhline(0.5, color="#999", linewidth=0.8, linestyle=":")
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=9, frameon=False)
    return figure


def _comparison_text(results: pd.DataFrame, calls: pd.DataFrame) -> str:
    """max vs abmil, in the measured numbers (empty when one of them was not run)."""
    by_name = {row["name"]: row for _, row in results.iterrows() if row["aggregator"] == row["name"]}
    if "max" not in by_name or "abmil" not in by_name:
        return ""
    first, second = by_name["max"], by_name["abmil"]

    def estimate(row, metric, low, high) -> str:
        return format_estimate(row[metric], row[low], row[high])

    text = (f"Max-of-tiles pooling (max) reached AUROC {estimate(first, 'auroc', 'auroc_low', 'auroc_high')} and "
            f"attention MIL (abmil) {estimate(second, 'auroc', 'auroc_low', 'auroc_high')}; balanced accuracy "
            f"{estimate(first, 'balanced_accuracy', 'bacc_low', 'bacc_high')} against "
            f"{estimate(second, 'balanced_accuracy', 'bacc_low', 'bacc_high')}.")
    overlap = not (first["auroc_high"] < second["auroc_low"] or second["auroc_high"] < first["auroc_low"])
    if not np.isnan(first["auroc_low"]) and not np.isnan(second["auroc_low"]):
        text += (" Their AUROC intervals overlap, so this test set does not separate them." if overlap else
                 " Their AUROC intervals do not overlap.")
    parts = []
    for stage in STAGE_ORDER:
        rows = calls[calls["stage"] == stage].set_index("aggregator")
        if "max" in rows.index and "abmil" in rows.index:
            slides = int(rows.loc["max", "slides"])
            parts.append(f"{STAGE_WORDS[stage]}: max {int(rows.loc['max', 'called_tumour'])} of {slides}, "
                         f"abmil {int(rows.loc['abmil', 'called_tumour'])} of {slides}")
    if parts:
        text += " Test slides called tumour, by stage: " + "; ".join(parts) + "."
    margins = []
    for name in ("max", "abmil"):
        rows = calls[calls["aggregator"] == name]
        tumour, normal = rows[rows["stage"] != "negative"], rows[rows["stage"] == "negative"]
        if len(tumour) and len(normal):
            mean_tumour = float(np.average(tumour["mean_probability"], weights=tumour["slides"]))
            mean_normal = float(normal["mean_probability"].iloc[0])
            margins.append(f"{name} {mean_tumour:.2f} on tumour and {mean_normal:.2f} on normal slides "
                           f"(a gap of {mean_tumour - mean_normal:.2f})")
    if len(margins) == 2:
        text += " Mean tumour probability: " + "; ".join(margins) + "."
    return text


def _results_table(results: pd.DataFrame) -> Table:
    shown = pd.DataFrame({
        "aggregator": results["aggregator"],
        "AUROC [95% interval]": [format_estimate(r.auroc, r.auroc_low, r.auroc_high) for r in results.itertuples()],
        "balanced accuracy [95% interval]": [format_estimate(r.balanced_accuracy, r.bacc_low, r.bacc_high)
                                             for r in results.itertuples()],
        "tokens in": results["tokens_in"].map(lambda v: format_number(v, 0)),
        "tokens kept": results["tokens_kept"].map(lambda v: format_number(v, 0)),
        "ms per slide": results["ms_per_slide"].map(lambda v: format_number(v, 1)),
        "peak memory (MB)": results["peak_memory_mb"].map(lambda v: format_number(v, 1)),
    })
    first = results.iloc[0]
    return Table(shown, f"slide level: {int(first['n_slides'])} test slides of {int(first['n_patients'])} patients, "
                        "intervals from resampling test patients")


def _stage_table(calls: pd.DataFrame) -> Table:
    if calls.empty:
        return Table(pd.DataFrame(), "no test slides")
    cells = calls.assign(cell=[f"{r.called_tumour} of {r.slides} (mean p {r.mean_probability:.2f})"
                               for r in calls.itertuples()])
    wide = cells.pivot(index="aggregator", columns="stage", values="cell")
    order = [stage for stage in STAGE_ORDER if stage in wide.columns]
    wide = wide[order].rename(columns=STAGE_WORDS).reindex(list(dict.fromkeys(calls["aggregator"])))
    return Table(wide.reset_index(), "test slides called tumour (probability >= 0.5) by stage; mean tumour "
                                     "probability in brackets (for normal slides, calls are false positives)")


def _cohort_section(manifest: dict[str, Any], config: dict[str, Any], steps: dict[str, Any],
                    features: dict[str, Any]) -> Section:
    slides = pd.DataFrame(manifest["slides"])
    rows = []
    for stage in STAGE_ORDER:
        part = slides[slides["stage"] == stage]
        if part.empty:
            continue
        diameters = [r["longest_diameter_um"] for regions in part["regions"] for r in regions]
        rows.append({"stage": STAGE_WORDS[stage], "slides": len(part),
                     "deposits": len(diameters),
                     "deposits' longest diameters (um)": (f"{min(diameters):.0f}-{max(diameters):.0f}" if diameters else "-"),
                     "tumour share of tissue": (f"{part['tumour_area_fraction'].min():.4f}-"
                                                f"{part['tumour_area_fraction'].max():.4f}")})
    parameters = manifest.get("parameters", {})
    width, height = parameters.get("size", ["?", "?"])
    weights = str(features.get("weights", ""))
    weights_words = ("random, untrained weights (seeded initialisation): the features are a fixed random projection "
                     "of the tiles' pixels, not learned" if weights.startswith("random-init") else f"weights {weights}")
    tiling = config["tiling"]
    timing = ", ".join(f"{name} {info['seconds']:.1f} s" + (" (reused)" if info.get("reused") else "")
                       for name, info in steps.items())
    blocks = [
        Paragraph(f"{len(slides)} slides of {width}x{height} px at {parameters.get('mpp', '?')} um/px, "
                  f"{slides['patient_id'].nunique()} patients (some with two slides), tumour deposits annotated "
                  "in ASAP XML. Stages follow the CAMELYON17 size classes of the largest deposit."),
        Table(pd.DataFrame(rows), "the cohort by stage"),
        Paragraph(f"Split: one fold of patients ({config['evaluation']['test_fraction']:.0%} of them) is the test "
                  "set, stratified by slide label and tumour stage; every aggregator uses the same split and "
                  f"trains for {config['fit']['epochs']} epochs (Adam, learning rate {config['fit']['lr']})."),
        Paragraph(f"Tiles: {tiling['tile_size']} px at {tiling['mpp']} um/px ({tiling['tile_size'] * tiling['mpp']:.0f} um), "
                  f"kept at tissue share >= {tiling.get('tissue_threshold', 0.5)}. Features: "
                  f"{features.get('backbone', '?')} ({features.get('dim', '?')} dimensions), {weights_words}."),
    ]
    if timing:
        blocks.append(Paragraph(f"Seconds per step of the last run of the study: {timing}."))
    return Section("cohort", "Cohort and pipeline", blocks)


def _heatmap_blocks(runs: list[dict[str, Any]], stages: dict[str, str], limit: int = 3) -> list:
    """The max and abmil heatmaps of up to ``limit`` test tumour slides, one of each stage first."""
    shown = [run for name in HEATMAP_AGGREGATORS for run in runs if run["spec"].label == name] or runs[:2]
    test = list(shown[0]["predictions"]["slide"])
    tumour = [s for stage in STAGE_ORDER[:3] for s in test if stages.get(s) == stage]
    picked = []
    for stage in STAGE_ORDER[:3]:  # one slide of each tumour stage, then more
        picked += [s for s in tumour if stages.get(s) == stage][:1]
    picked += [s for s in tumour if s not in picked]
    blocks = []
    how = ("The slide's thumbnail with each tile coloured by the aggregator's importance, as a percentile within the "
           "slide (dark red: the most important tiles, dark blue: the least); annotated tumour deposits are outlined "
           "in black. Uncoloured tissue was not read. A good map is red inside the outlines.")
    for slide in picked[:limit]:
        for run in shown:
            path = run["dir"] / formats.SLIDE_HEATMAPS_DIR / f"{slide}.png"
            if not path.is_file():
                continue
            blocks.append(FigureBlock(
                name=f"heatmap_{file_name(run['spec'].run_id)}_{file_name(slide)}.png", png=path.read_bytes(),
                caption=f"{slide} ({STAGE_WORDS[stages[slide]]}), {run['spec'].label}",
                how_to_read=how if not blocks else "As the first heatmap of this section.",
            ))
    if not blocks:
        return [Note("No heatmaps: the runs hold no heatmaps/<slide>.png (the slide files were gone when they ran).")]
    return blocks


def _best_text(ranked: pd.DataFrame) -> str:
    """The highest AUROC and every aggregator that reaches it (at the two decimals shown)."""
    if ranked.empty:
        return ""
    top = round(float(ranked.iloc[0]["auroc"]), 2)
    tied = [row["aggregator"] for _, row in ranked.iterrows() if round(float(row["auroc"]), 2) == top]
    if len(tied) == 1:
        return f" Highest AUROC: {tied[0]} ({top:.2f})."
    return f" Highest AUROC: {top:.2f}, reached by {len(tied)} of {len(ranked)} aggregators ({', '.join(tied)})."


def build_slides_study_report(out: str | Path) -> Path:
    """Write OUT/report.html, OUT/report.md and OUT/figures/ from a slide study folder; return the HTML path."""
    from histotoken.reporting.plots import figure_to_png

    out = Path(out)
    config = read_json(out / STUDY_FILE)
    manifest = read_json(out / COHORT_DIR / "cohort.json")
    steps = read_json(out / STEPS_FILE) if (out / STEPS_FILE).is_file() else {}
    features = read_json(out / FEATURES_DIR / "manifest.json")
    stages = {record["slide"]: record["stage"] for record in manifest["slides"]}
    runs = _runs(out, config)
    results = results_frame(runs)
    calls = stage_calls(runs, stages)
    splits = {run["spec"].label: tuple(sorted(run["predictions"]["slide"])) for run in runs}
    same_split = len(set(splits.values())) == 1

    comparison = _comparison_text(results, calls)
    best = results.dropna(subset=["auroc"]).sort_values("auroc", ascending=False)
    summary = [Paragraph(
        f"{len(runs)} aggregators trained on the same patient-level split of a synthetic cohort of "
        f"{len(manifest['slides'])} slides and tested on {int(results['n_slides'].iloc[0])} slides."
        + _best_text(best))]
    if comparison:
        summary.append(Paragraph(comparison))
    if not same_split:
        summary.append(Note("The runs were tested on different slides (their split.csv differ); compare them with care."))
    figure = accuracy_tokens_figure(results)
    sections = [
        Section("summary", "Summary", summary),
        Section("slides", "Slide-level results", [
            Paragraph("One row per aggregator: AUROC and balanced accuracy on the test slides with 95% intervals over "
                      "resampled test patients; tokens in and tokens kept per slide (means); milliseconds per slide "
                      "for the aggregator's prediction from the feature file (reading it included; tiling and "
                      "embedding are in the step times below); peak memory growth of the process."),
            _results_table(results),
            _stage_table(calls),
        ]),
        Section("tokens", "Accuracy against tokens kept", [FigureBlock(
            name="accuracy_vs_tokens.png", png=figure_to_png(figure),
            caption="slide-level AUROC and balanced accuracy against the tokens each aggregator kept",
            how_to_read=("One point per aggregator; bars are 95% intervals over test patients; the dotted line is "
                         "chance (0.5). Further left means fewer tokens reach the classifier head."),
        )]),
        Section("heatmaps", "Heatmaps of test tumour slides", _heatmap_blocks(runs, stages)),
        _cohort_section(manifest, config, steps, features),
    ]
    notes = sorted({note for run in runs for note in run["eval"].get("notes") or []})
    if notes:
        sections[1].blocks.append(Note("Notes from the evaluation: " + " ".join(notes)))
    title = f"Slide study on a synthetic cohort: {len(runs)} aggregators, {len(manifest['slides'])} slides"
    path = write_report(out, title, sections, BANNER)
    logger.info("wrote %s", path)
    return path
