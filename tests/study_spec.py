"""A tiny grid study spec shared by the grid tests, and fake cluster commands written as scripts."""

from __future__ import annotations

import json
import stat
from pathlib import Path

PROTOCOL = {"img_size": 32, "epochs": 1, "batch_size": 16, "precision": "32-true", "bootstrap": 20, "num_workers": 0}


def spec_dict(data, **changes) -> dict:
    """A study of resnet18 on subtypes, trained on 100 and 400, tested on 100, one seed; ``changes`` replace keys."""
    raw = {
        "name": "study", "data": str(data), "tasks": ["subtype"], "models": ["resnet18"],
        "train_domains": ["100", "400"], "test_domains": ["100"], "seeds": [0],
        "protocol": PROTOCOL, "efficiency": {"batch_size": 2, "rounds": 1},
    }
    raw.update(changes)
    return raw


def write_script(folder: Path, name: str, body: str) -> Path:
    """An executable shell script FOLDER/NAME (a stand-in for sbatch, sinfo, squeue...)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def mark_finished(paths, domains: tuple[str, ...] = ("100",)) -> None:
    """Make a run folder (``formats.RunPaths``) look finished: status finished, an eval file per test domain."""
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.status.write_text(json.dumps({"state": "finished", "error": None}))
    for domain in domains:
        paths.eval_file(domain).parent.mkdir(parents=True, exist_ok=True)
        paths.eval_file(domain).write_text("{}")
