"""Reporting: read a study folder's result files and write tables, figures and report.html.

Only files are read (see ``docs/formats.md``); nothing here imports torch or re-runs a model.
"""

from histotoken.reporting.report import build_report, load_study
from histotoken.reporting.tables import pareto_front

__all__ = ["build_report", "load_study", "pareto_front"]
