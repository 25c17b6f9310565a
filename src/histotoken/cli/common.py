"""Options shared by several commands."""

from __future__ import annotations

import argparse

from histotoken.config import DATA_FORMATS

EPILOG_DOMAINS = (
    "Domains: a magnification 40, 100, 200 or 400; a set joined by '+' such as 100+400 "
    "(what published studies call mixed-magnification); or all."
)


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def add_command(subparsers, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(name, help=summary, description=description, formatter_class=formatter)


DATA_FORMAT_CHOICES = DATA_FORMATS  # auto + every registered data source


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """--data-format and --groups, shared by train, split and index."""
    parser.add_argument(
        "--data-format", choices=DATA_FORMAT_CHOICES, default=None,
        help="kind of data folder (default auto: detected from the folder; see docs/data_sources.md)",
    )
    parser.add_argument(
        "--groups", metavar="CSV",
        help="ImageFolder: CSV image,group mapping each image (relative path or file name) to its patient/group "
        "(default DATA_ROOT/groups.csv when present); splits keep a group on one side",
    )
