"""The demo: a synthetic BreakHis plus the demo study on it (``histotoken demo``, ``make demo``)."""

from __future__ import annotations

import logging
from pathlib import Path

from histotoken.config import read_yaml
from histotoken.experiments.grid import GridOutcome, run_grid
from histotoken.experiments.spec import spec_from_dict

logger = logging.getLogger(__name__)


def run_demo(out: Path, spec_path: Path, on_run=None, overrides: dict | None = None) -> GridOutcome:
    """Generate the synthetic data set the spec's ``synthetic:`` block describes, then run the study.

    ``overrides`` replaces top-level spec keys (tests use it to shrink the demo).
    """
    from histotoken.data.synthetic import generate_synthetic_breakhis

    raw = read_yaml(spec_path)
    raw.update(overrides or {})
    synthetic = dict(raw.pop("synthetic", None) or {})
    if "size" in synthetic:
        synthetic["size"] = tuple(synthetic["size"])
    if "magnifications" in synthetic:
        synthetic["magnifications"] = tuple(synthetic["magnifications"])
    data_dir = out / "synthetic_breakhis"
    logger.info("making the synthetic data set in %s", data_dir)
    generate_synthetic_breakhis(data_dir, **synthetic)
    spec = spec_from_dict(raw, str(spec_path), data=str(data_dir))
    return run_grid(spec, out / "study", on_run=on_run)
