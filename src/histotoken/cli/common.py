"""Options shared by several commands."""

from __future__ import annotations

import argparse

EPILOG_DOMAINS = (
    "Domains: a magnification 40, 100, 200 or 400; a set joined by '+' such as 100+400 "
    "(what published studies call mixed-magnification); or all."
)


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def add_command(subparsers, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(name, help=summary, description=description, formatter_class=formatter)
