"""histotoken demo: the whole pipeline on a small synthetic BreakHis, in minutes on a laptop CPU."""

from __future__ import annotations

from histotoken.cli.common import add_command

DESCRIPTION = """\
Make a small SYNTHETIC BreakHis (procedurally drawn H&E-like images, not real tissue), then
run the study in configs/demo.yaml on it: a CNN, a ViT, an MLP-Mixer and token-efficient
models, trained on 100x, 400x and 100x+400x and tested on all three, and write the report.
It shows what a real study produces; its numbers say nothing about real pathology.
Takes about 10-15 minutes on two CPU cores. Re-running resumes where it stopped.

Example:
  histotoken demo --out demo_output
"""


def add_parser(subparsers):
    parser = add_command(subparsers, "demo", "synthetic data -> model grid -> report.html", DESCRIPTION)
    parser.add_argument("--out", default="demo_output", metavar="DIR", help="output folder (default demo_output)")
    parser.add_argument("--spec", default=None, metavar="YAML", help="another study file to run on the synthetic data")
    return parser


def run(args) -> int:
    from pathlib import Path

    from histotoken.cli.grid import print_outcome, print_run, resolve_spec_path
    from histotoken.experiments.demo import run_demo

    spec_path = resolve_spec_path(args.spec or "demo.yaml")
    return print_outcome(run_demo(Path(args.out), spec_path, on_run=print_run))
