"""Report section "Failed runs": the runs that failed, with their errors."""

from __future__ import annotations

from histotoken.reporting import tables
from histotoken.reporting.blocks import Note, Paragraph, Table
from histotoken.reporting.formatting import MISSING
from histotoken.reporting.sections.context import ReportSection, SectionContext


def build(context: SectionContext) -> list:
    runs = context.study.runs
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




SECTION = ReportSection("failed", "Failed runs", build, needs_results=False)
