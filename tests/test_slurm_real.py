"""A study grid on a real single-node SLURM cluster: a job cancelled with scancel, a job at its time limit.

Needs a running SLURM (``bash .ci/slurm.sh start`` sets one up from Debian's slurm-wlm and munge;
``.ci/run`` starts it, runs ``make test-slurm`` and stops it). Without ``sinfo`` the test is skipped,
unless CI=true, where a missing cluster is a failure.

The runs are sized never to finish (400 epochs of about 2 s): the test watches what SLURM does to
them and cancels them when it has seen it, so it takes about 4 minutes whatever the machine's speed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml

from histotoken.experiments.spec import expand, spec_from_dict
from histotoken.formats import RunPaths, StudyPaths

pytestmark = pytest.mark.slurm

TIME_LIMIT_MIN = 2  # SLURM warns the job (USR2) 30 s before, up to a minute earlier: it requeues within ~90 s


def slurm_or_skip() -> None:
    answer = None
    if shutil.which("sinfo"):
        answer = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30, check=False)
    if answer is not None and answer.returncode == 0 and answer.stdout.strip():
        return
    said = [] if answer is None else (answer.stderr or answer.stdout or "no nodes").strip().splitlines()
    why = "sinfo is not installed" if answer is None else f"sinfo said: {said[-1] if said else 'nothing'}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but no SLURM cluster answers ({why}); .ci/run starts one with `bash .ci/slurm.sh start`")
    pytest.skip(f"no SLURM cluster ({why}): start one with `bash .ci/slurm.sh start` (root, Debian), "
                "then run `make test-slurm`")


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, grid_log: Path) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            queue = subprocess.run(["squeue", "-r", "-t", "all"], capture_output=True, text=True, check=False).stdout
            log = grid_log.read_text()[-3000:] if grid_log.is_file() else ""
            pytest.fail(f"waited {timeout_s:.0f} s for {what}\nsqueue:\n{queue}\ngrid output:\n{log}")
        time.sleep(1.0)


def metrics(paths: RunPaths) -> pd.DataFrame:
    try:
        return pd.read_csv(paths.metrics)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame({"epoch": [], "epoch_time_s": []})


def attempts(paths: RunPaths) -> list[dict]:
    if not paths.attempts.is_file():
        return []
    return [json.loads(line) for line in paths.attempts.read_text().splitlines() if line.strip()]


def job_log(study: Path, job_id: str) -> str:
    return "".join(path.read_text() for path in (study / "submitit" / job_id).glob("*.err"))


def assert_resumed_without_losing_an_epoch(before: pd.DataFrame, after: pd.DataFrame) -> None:
    """Epochs are 1..n once each, and those finished before the interruption were not trained again."""
    assert after["epoch"].tolist() == list(range(1, len(after) + 1))
    assert len(after) > len(before) >= 1
    kept = after[after["epoch"] <= before["epoch"].max()]
    assert kept["epoch_time_s"].tolist() == before["epoch_time_s"].tolist()


def test_a_grid_on_slurm_requeues_at_the_time_limit_and_resumes_a_cancelled_run(synthetic_root, tmp_path):
    slurm_or_skip()
    raw = {
        "name": "slurm-real", "data": str(synthetic_root), "tasks": ["binary"], "models": ["resnet10t"],
        "train_domains": ["100", "400"], "test_domains": ["100"], "seeds": [0],
        "protocol": {"img_size": 128, "epochs": 400, "batch_size": 8, "precision": "32-true", "bootstrap": 20,
                     "num_workers": 0, "early_stopping_patience": 1000},
        "efficiency": {"batch_size": 2, "rounds": 1},
        "launcher": {"cpus_per_task": 1, "timeout_min": TIME_LIMIT_MIN, "parallel": 2},
    }
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    study = tmp_path / "study"
    cancelled_run, limited_run = sorted(run.run_id for run in expand(spec_from_dict(raw, str(spec_file))))
    cancelled = RunPaths(StudyPaths(study).run_dir(cancelled_run))
    limited = RunPaths(StudyPaths(study).run_dir(limited_run))
    command = [sys.executable, "-m", "histotoken.cli.main", "grid", str(spec_file), "--out", str(study),
               "--launcher", "slurm", "--no-report"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    seen_jobs: set[str] = set()  # to cancel at the end
    grids = []

    def start_grid(log: Path) -> subprocess.Popen:
        grid = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        grids.append(grid)
        return grid

    def job_of(paths: RunPaths, start: int) -> str:
        job_id = attempts(paths)[start]["job_id"]
        seen_jobs.add(job_id)
        return job_id

    try:
        # 1. both runs train as tasks of one job array
        log1 = tmp_path / "grid1.log"
        grid = start_grid(log1)
        wait_for(lambda: len(metrics(cancelled)) >= 2 and len(metrics(limited)) >= 1, 240, "two runs training", log1)

        # 2. scancel one job: its run is interrupted and the grid reports the job's end
        cancelled_job = job_of(cancelled, 0)
        subprocess.run(["scancel", cancelled_job], check=True)
        wait_for(lambda: json.loads(cancelled.status.read_text()).get("state") == "interrupted", 60,
                 "the cancelled run to be marked interrupted", log1)
        at_cancel = metrics(cancelled)

        # 3. the other job reaches its time limit: it saves, requeues itself, and the requeued job resumes
        snapshot = metrics(limited)

        def resumed() -> bool:
            nonlocal snapshot
            if len(attempts(limited)) < 2:
                snapshot = metrics(limited)  # the last epochs seen before the requeue
                return False
            return len(metrics(limited)) > len(snapshot) + 1

        wait_for(resumed, 60 * TIME_LIMIT_MIN + 120, "the time-limited job to requeue and resume", log1)
        first, again = attempts(limited)[:2]
        assert (first["requeues"], again["requeues"]) == (0, 1)
        assert first["token"] == again["token"] and first["job_id"] == again["job_id"]  # the same job, requeued
        limited_job = job_of(limited, 0)
        log = job_log(study, limited_job)
        assert "Caught signal SIGUSR2" in log and "its job is requeued" in log and "resuming stage" in log
        assert_resumed_without_losing_an_epoch(snapshot, metrics(limited))

        # 4. cancel it too: the grid ends with both runs interrupted (exit 143, SIGTERM)
        subprocess.run(["scancel", limited_job], check=True)
        assert grid.wait(timeout=120) == 143
        out = log1.read_text()
        assert f"job {cancelled_job} {cancelled_run}: CANCELLED" in out
        assert f"INTERRUPTED {cancelled_run}" in out and f"INTERRUPTED {limited_run}" in out
        runs = pd.read_csv(study / "runs.csv").set_index("run_id")
        assert runs.loc[[cancelled_run, limited_run], "status"].tolist() == ["interrupted", "interrupted"]

        # 5. the same command again resumes the cancelled run from its last finished epoch
        log2 = tmp_path / "grid2.log"
        grid = start_grid(log2)
        wait_for(lambda: len(attempts(cancelled)) >= 2 and len(metrics(cancelled)) > len(at_cancel) + 1, 240,
                 "the cancelled run to resume", log2)
        resumed_job = job_of(cancelled, 1)
        assert resumed_job != cancelled_job
        assert "resuming stage" in job_log(study, resumed_job)
        assert_resumed_without_losing_an_epoch(at_cancel, metrics(cancelled))
        for paths in (cancelled, limited):
            for start in range(len(attempts(paths))):
                job_of(paths, start)
    finally:  # every job of this study, seen or still pending
        subprocess.run(["scancel", "--name", f"histotoken-{raw['name']}", *sorted(seen_jobs)], check=False)
        for grid in grids:
            try:
                grid.wait(timeout=120)
            except subprocess.TimeoutExpired:
                grid.kill()
