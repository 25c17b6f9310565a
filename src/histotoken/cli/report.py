"""``histotoken report STUDY_DIR``: rebuild report.html, report.md and figures/ from a study's files."""

from __future__ import annotations

import argparse
from pathlib import Path

from histotoken.cli.common import add_command

DESCRIPTION = """\
Rebuild a study's report from its files alone (nothing is re-run). First runs.csv and
results.csv are rebuilt from the run folders (so runs that other workers finished are in;
--no-collect skips this), then a self-contained
report.html (figures and styles inline; opens offline), report.md with the same tables,
and the figures (PNG plots, JPEG photographs) in figures/ beside it. --figures external
keeps the figures out of report.html (it refers to figures/ instead).

Example:
  histotoken grid configs/demo.yaml --out study
  histotoken report study                      # -> study/report.html
  histotoken report study --figures external   # report.html + figures/ (keep them together)
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = add_command(subparsers, "report", "rebuild report.html from a study folder", DESCRIPTION)
    parser.add_argument("study_dir", type=Path, metavar="STUDY_DIR", help="folder written by `histotoken grid`")
    parser.add_argument(
        "--out", type=Path, default=None,
        help="where to write the HTML report (default: STUDY_DIR/report.html); "
             "report.md and figures/ go beside it",
    )
    parser.add_argument(
        "--figures", choices=("inline", "external"), default="inline",
        help="inline: one self-contained report.html (default); external: report.html refers to the "
             "figures in figures/ beside it (smaller page for big studies; keep the folder together)",
    )
    parser.add_argument(
        "--no-collect", action="store_true",
        help="use runs.csv and results.csv as they are instead of rebuilding them from the run folders",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from histotoken.formats import StudyPaths
    from histotoken.reporting import build_report

    paths = StudyPaths(args.study_dir)
    if not args.no_collect and paths.spec.is_file() and paths.runs_dir.is_dir():
        from histotoken.experiments.grid import collect_tables

        try:
            runs = collect_tables(args.study_dir)
            print(f"tables rebuilt from {len(runs)} run folders: {paths.runs_table}, {paths.results_table}")
        except (OSError, ValueError) as error:  # a report from the tables as they are is still useful
            print(f"warning: could not rebuild the study tables ({error}); using them as they are")
    out = build_report(args.study_dir, out=args.out, figures=args.figures)
    from histotoken.reporting.report import describe_report

    print(f"report: {describe_report(out, external_figures=args.figures == 'external')}")
    print(f"markdown: {out.with_suffix('.md')}  figures: {out.parent / 'figures'}")
    return 0
