"""The slide study demo: synthetic cohort -> tile -> embed -> several aggregators -> report.html.

``histotoken slides demo --out DIR`` runs the study that ``configs/slides_demo.yaml`` describes, with the
library functions of the commands it stands for (no shelling out)::

    DIR/cohort/     histotoken synth --slides N           (data.wsi.cohort.generate_cohort)
    DIR/tiles/      histotoken tile                       (data.wsi.tiling.tile_slides)
    DIR/features/   histotoken embed                      (features.embed.embed)
    DIR/runs/<id>/  histotoken slides train, one per aggregator (mil.train.train_run; heatmaps included)
    DIR/report.html the slide study report                (reporting.slides_study.build_slides_study_report)
    DIR/steps.json  seconds per step, and which steps were reused

Every step resumes: the cohort and the tile folder skip finished slides, embed reuses finished feature
files, and a run whose eval.json exists with the same configuration is not trained again. All
aggregators share one patient-level split (same seed and test fraction), stratified by slide label and
tumour stage, so that macro, micro and ITC-like slides are all tested.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from histotoken import formats
from histotoken.io import atomic_write_json, read_json
from histotoken.reporting.slides_study import (
    COHORT_DIR,
    CONFIG_NAME,
    FEATURES_DIR,
    RUNS_DIR,
    STEPS_FILE,
    STUDY_FILE,
    TILES_DIR,
    AggregatorSpec,
)

logger = logging.getLogger(__name__)


def shipped_config() -> Path:
    """The slides_demo.yaml shipped inside the package (a copy of configs/slides_demo.yaml)."""
    return Path(__file__).resolve().parent.parent / "configs" / CONFIG_NAME


def set_override(config: dict[str, Any], text: str) -> None:
    """Apply ``a.b=value`` (YAML value) to the nested ``config`` in place; unknown keys are refused."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"--set {text!r}: write KEY=VALUE, e.g. --set cohort.slides=12")
    parts = key.strip().split(".")
    node = config
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            known = ", ".join(sorted(node)) if isinstance(node, dict) else "none"
            raise ValueError(f"--set {text!r}: {'.'.join(parts[:depth + 1])} is not a setting of {CONFIG_NAME} "
                             f"(known here: {known})")
        if depth == len(parts) - 1:
            node[part] = yaml.safe_load(value)
        else:
            node = node[part]


def load_config(path: str | Path | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()) -> dict[str, Any]:
    """The study configuration: the YAML file (default: the shipped one) with ``key.sub=value`` overrides."""
    path = Path(path) if path else shipped_config()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such slide study file (the shipped one is {shipped_config()})")
    config = yaml.safe_load(path.read_text())
    items = [f"{k}={json.dumps(v)}" for k, v in overrides.items()] if isinstance(overrides, Mapping) else overrides
    for text in items:
        set_override(config, text)
    from histotoken.mil.aggregators import AGGREGATORS

    for text in config["aggregators"]:
        name = AggregatorSpec.parse(text).name
        if name not in AGGREGATORS:
            raise ValueError(f"{path}: unknown aggregator {name!r} in aggregators; choose from {', '.join(AGGREGATORS)}")
    return config


def _timed(steps: dict[str, Any], name: str, work: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = work()
    steps[name] = {"seconds": round(time.perf_counter() - start, 2)}
    return result


def _run_is_current(run_dir: Path, wanted: Mapping[str, Any]) -> bool:
    """True when RUN/eval.json exists and RUN/config.json matches the wanted settings."""
    if not (run_dir / "eval.json").is_file() or not (run_dir / "config.json").is_file():
        return False
    found = read_json(run_dir / "config.json")
    return all(found.get(key) == value for key, value in wanted.items())


def run_slides_demo(out: str | Path, config: Mapping[str, Any] | None = None,
                    on_step: Callable[[str, dict[str, Any]], None] | None = None) -> Path:
    """Run the slide study into ``out`` (resuming); returns the report's path."""
    from histotoken.data.wsi.cohort import CohortSettings, generate_cohort, slide_paths
    from histotoken.data.wsi.reader import Resolution
    from histotoken.data.wsi.tiling import TilingSettings, slide_jobs, tile_slides
    from histotoken.features.embed import EmbedSettings, embed
    from histotoken.mil.train import FitConfig
    from histotoken.reporting.slides_study import build_slides_study_report

    config = copy.deepcopy(dict(config) if config is not None else load_config())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / STUDY_FILE, config)
    steps: dict[str, Any] = {}
    report = on_step or (lambda name, info: None)
    workers = int(config.get("workers", 1))

    cohort_cfg = config["cohort"]
    cohort = out / COHORT_DIR
    settings = CohortSettings(n_slides=int(cohort_cfg["slides"]), size=tuple(cohort_cfg["slide_size"]),
                              mpp=float(cohort_cfg.get("mpp", 1.0)),
                              tumour_share=float(cohort_cfg.get("tumour_share", 0.5)), seed=int(cohort_cfg["seed"]))
    summary = _timed(steps, "cohort", lambda: generate_cohort(cohort, settings, workers=workers))
    steps["cohort"]["reused"] = summary.created == 0
    report("cohort", steps["cohort"])

    tiling_cfg = config["tiling"]
    tiles = out / TILES_DIR
    tiling = TilingSettings(tile_size=int(tiling_cfg["tile_size"]), resolution=Resolution(float(tiling_cfg["mpp"]), "mpp"),
                            tissue_threshold=float(tiling_cfg.get("tissue_threshold", 0.5)),
                            min_tumor_fraction=float(tiling_cfg.get("min_tumor_fraction", 0.5)))
    jobs = slide_jobs(slide_paths(cohort), cohort / "annotations", cohort / "slides.csv")
    pending = sum(not formats.TilePaths(tiles).table(job.name).is_file() for job in jobs)
    tiled = _timed(steps, "tile", lambda: tile_slides(jobs, tiles, tiling, workers=workers))
    failed = tiled[tiled["status"] != "done"]
    if len(failed):
        raise RuntimeError(f"{tiles}: {len(failed)} slide(s) failed to tile, e.g. {failed['error'].iloc[0]}")
    steps["tile"].update(reused=pending == 0, tiles=int(tiled["n_tiles"].sum()))
    report("tile", steps["tile"])

    embed_cfg = config["embed"]
    features = out / FEATURES_DIR
    embedded = _timed(steps, "embed", lambda: embed(tiles, features, EmbedSettings(
        model=str(embed_cfg["model"]), img_size=int(embed_cfg["img_size"]),
        batch_size=int(embed_cfg.get("batch_size", 128)))))
    steps["embed"].update(reused=not embedded.computed, backbone=embedded.manifest["backbone"],
                          weights=embedded.manifest["weights"], dim=embedded.manifest["dim"])
    report("embed", steps["embed"])

    fit_cfg, eval_cfg = config["fit"], config["evaluation"]
    fit = FitConfig(epochs=int(fit_cfg["epochs"]), lr=float(fit_cfg["lr"]), seed=int(fit_cfg["seed"]),
                    train_max_tiles=int(fit_cfg.get("train_max_tiles", 8192)))
    with torch_threads(int(config.get("train_threads", 1))):
        for text in config["aggregators"]:
            _train_one(out, AggregatorSpec.parse(text), fit, eval_cfg, embedded.computed, steps, report)

    path = _timed(steps, "report", lambda: build_slides_study_report(out))
    report("report", steps["report"])
    atomic_write_json(out / STEPS_FILE, steps)
    return path


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads, then restore the previous number. Bags of a few
    hundred tokens through a small aggregator are 5-30x faster on one thread than on two busy cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_one(out: Path, spec: AggregatorSpec, fit, eval_cfg: Mapping[str, Any], computed: Sequence[str],
               steps: dict[str, Any], report: Callable[[str, dict[str, Any]], None]) -> None:
    """Train and evaluate one aggregator into DIR/runs/<id>, unless a finished run with the same settings is there
    and no feature file changed."""
    from histotoken.mil.train import train_run

    run_dir = out / RUNS_DIR / spec.run_id
    wanted = {"aggregator": spec.name, "aggregator_kwargs": spec.kwargs, "epochs": fit.epochs, "lr": fit.lr,
              "seed": fit.seed, "test_fraction": float(eval_cfg["test_fraction"]),
              "n_resamples": int(eval_cfg["bootstrap"]), "train_max_tiles": fit.train_max_tiles,
              "stratified_by_strata": True}
    name = f"train {spec.label}"
    if _run_is_current(run_dir, wanted) and not computed:
        steps[name] = {"seconds": 0.0, "reused": True}
    else:
        stages = {r["slide"]: r["stage"] for r in read_json(out / COHORT_DIR / "cohort.json")["slides"]}
        _timed(steps, name, lambda: train_run(
            out / FEATURES_DIR, out / COHORT_DIR / "slides.csv", spec.name, run_dir, fit,
            float(eval_cfg["test_fraction"]), n_resamples=int(eval_cfg["bootstrap"]), aggregator_kwargs=spec.kwargs,
            strata=stages))  # every stage (macro, micro, ITC-like, normal) on both sides of the split
        steps[name]["reused"] = False
    report(name, steps[name])
    atomic_write_json(out / STEPS_FILE, steps)
