"""Report section "Per-run details": confusion matrix and training curves of every finished run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histotoken.formats import RunPaths
from histotoken.reporting import plots, tables
from histotoken.reporting.blocks import Details, Note, Paragraph
from histotoken.reporting.formatting import MISSING, file_name
from histotoken.reporting.sections.context import ReportSection, SectionContext


def build(context: SectionContext) -> list:
    blocks: list = [Paragraph(
        "For every run that finished: the confusion matrix on its own training magnification's test "
        "split (eval/<train domain>.json) and its training curves (metrics.csv)."
    )]
    info = context.study.run_info()
    failed = {run_id for run_id, row in info.items() if row.get("status") == "failed"}
    shown_any = False
    for run_id, run_dir in context.study.run_folders():
        if run_id in failed:
            continue
        row = info.get(run_id, {})
        summary = (f"{run_id}: {row.get('model', MISSING)}, trained on {row.get('train_domain', MISSING)}, "
                   f"seed {row.get('seed', MISSING)}")
        blocks.append(Details(summary, _run_blocks(context, run_id, run_dir, row), open=not shown_any))
        shown_any = True
    if not shown_any:
        blocks.append(Note("No finished run to show."))
    return blocks



def _run_blocks(context: SectionContext, run_id: str, run_dir: Path, row: dict) -> list:
    blocks: list = []
    if not run_dir.is_dir():
        return [Note(f"The run folder {run_dir} is missing.")]
    paths = RunPaths(run_dir)
    status = tables.read_json_if_present(paths.status)
    best = tables.read_json_if_present(paths.best_meta)
    best_epoch = status.get("best_epoch") if isinstance(status, dict) else None
    best_stage = best.get("stage") if isinstance(best, dict) and best.get("epoch") == best_epoch else None
    if isinstance(status, dict):
        stages = status.get("stages_done") or []
        where = f" (stage {best_stage})" if best_stage is not None and len(stages) > 1 else ""
        blocks.append(Paragraph(
            f"State: {status.get('state', MISSING)}; best epoch: {best_epoch if best_epoch is not None else MISSING}"
            f"{where}" + (f"; stages: {', '.join(map(str, stages))}" if stages else "") + "."
        ))
    train_domain = str(row.get("train_domain", ""))
    evaluation = tables.read_json_if_present(RunPaths(run_dir).eval_file(train_domain))
    if isinstance(evaluation, dict) and evaluation.get("confusion_matrix") and evaluation.get("class_names"):
        blocks.append(context.figure(
            f"run_{file_name(run_id)}_confusion",
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
    metrics = tables.read_csv_if_present(paths.metrics, {"stage": str})
    if metrics is not None and len(metrics):
        blocks.append(context.figure(
            f"run_{file_name(run_id)}_curves",
            plots.training_curves_figure(metrics, f"{run_id}", best_epoch=best_epoch, best_stage=best_stage),
            f"Training curves of {run_id}.",
            "Left: training and validation loss per epoch (lower is better; a widening gap means "
            "over-fitting); right: validation macro-F1, the star marks the best epoch (the one named above, "
            "from status.json); the axis numbers epochs as metrics.csv does; dotted vertical lines mark where "
            "a new training stage began.",
        ))
    else:
        blocks.append(Note("metrics.csv is missing or empty: no training curves for this run."))
    return blocks




SECTION = ReportSection("runs", "Per-run details", build, needs_results=False)
