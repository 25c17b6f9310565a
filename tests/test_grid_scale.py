"""Grids at scale: shards, atomic run claims, concurrent workers on one study, submitit, --collect."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from histotoken.experiments import locks
from histotoken.experiments.grid import collect_study, run_grid, runs_table
from histotoken.experiments.launch import launch_runs, launcher_settings, parse_shard, shard_runs
from histotoken.experiments.spec import expand, spec_from_dict
from histotoken.formats import RunPaths, StudyPaths
from tests import study_spec


def spec_dict(data, **changes):
    return study_spec.spec_dict(data, **{"name": "scale", **changes})


def attempts(run_dir: Path) -> list[dict]:
    path = RunPaths(run_dir).attempts
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# --------------------------------------------------------------------------- shards


@pytest.mark.parametrize("text", ["3/3", "-1/2", "1", "a/b", "1/0", "0/-2"])
def test_a_bad_shard_is_refused_with_the_expected_form(text):
    with pytest.raises(ValueError, match="expected I/N with 0 <= I < N"):
        parse_shard(text)


def test_shards_split_the_runs_into_disjoint_deterministic_shares(tmp_path):
    spec = spec_from_dict(spec_dict(tmp_path, models=["resnet18", "mixer_tiny"], seeds=[0, 1, 2]), "s.yaml")
    runs = expand(spec)
    shares = [shard_runs(runs, parse_shard(f"{i}/4")) for i in range(4)]
    ids = [run.run_id for share in shares for run in share]
    assert sorted(ids) == sorted(run.run_id for run in runs)  # every run in exactly one shard
    assert [len(share) for share in shares] == [3, 3, 3, 3]
    # the same share whatever order the runs are listed in
    assert shard_runs(list(reversed(runs)), (1, 4)) == shares[1]


# --------------------------------------------------------------------------- claims


def test_a_run_can_be_claimed_once_until_released(tmp_path):
    first = locks.claim_run(tmp_path / "run")
    assert first is not None
    record = json.loads(first.path.read_text())
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
    assert locks.claim_run(tmp_path / "run") is None
    locks.release(first)
    assert not first.path.exists()
    assert locks.claim_run(tmp_path / "run") is not None


def test_a_claim_by_a_dead_process_on_this_host_is_taken_over(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # its pid is now gone
    claim_file = RunPaths(tmp_path / "run").claim
    claim_file.parent.mkdir(parents=True)
    claim_file.write_text(json.dumps({"host": socket.gethostname(), "pid": process.pid, "started": 0, "token": "x"}))
    claim = locks.claim_run(tmp_path / "run", stale_after_s=3600)
    assert claim is not None and json.loads(claim_file.read_text())["token"] == claim.token


def test_a_claim_from_another_host_is_kept_until_its_heartbeat_is_older_than_the_timeout(tmp_path):
    claim_file = RunPaths(tmp_path / "run").claim
    claim_file.parent.mkdir(parents=True)
    claim_file.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0, "token": "x"}))
    assert locks.claim_run(tmp_path / "run", stale_after_s=60) is None
    old = time.time() - 120
    os.utime(claim_file, (old, old))
    assert locks.claim_run(tmp_path / "run", stale_after_s=60) is not None


def test_a_heartbeat_keeps_a_long_claim_fresh(tmp_path):
    claim = locks.claim_run(tmp_path / "run", stale_after_s=0.4)
    old = time.time() - 100
    os.utime(claim.path, (old, old))
    with locks.heartbeat(claim, stale_after_s=0.4):
        time.sleep(0.5)  # two beats at 0.1 s
        assert claim.path.stat().st_mtime > old + 50
        assert locks.active_claim(tmp_path / "run", stale_after_s=0.4) is not None


# --------------------------------------------------------------------------- the grid with claims


def test_an_interrupted_run_stops_the_grid_and_frees_its_claim(synthetic_root, tmp_path, monkeypatch):
    import histotoken.engine.fit as fit

    started = []

    def interrupted_train(config, run_dir, **kwargs):
        started.append(Path(run_dir).name)
        raise KeyboardInterrupt

    monkeypatch.setattr(fit, "train", interrupted_train)
    spec = spec_from_dict(spec_dict(synthetic_root), "s.yaml")
    with pytest.raises(KeyboardInterrupt):
        run_grid(spec, tmp_path / "study", build_report=False)
    assert len(started) == 1  # the second run was not started
    assert not RunPaths(StudyPaths(tmp_path / "study").run_dir(started[0])).claim.exists()


def test_a_run_claimed_by_another_worker_is_skipped_and_listed_as_running(synthetic_root, tmp_path, monkeypatch):
    import histotoken.engine.evaluate as evaluate
    import histotoken.engine.fit as fit

    trained = []
    monkeypatch.setattr(fit, "train", lambda config, run_dir, **kwargs: trained.append(Path(run_dir).name))
    monkeypatch.setattr(evaluate, "evaluate_run", lambda run_dir, domain, **kwargs: None)
    spec = spec_from_dict(spec_dict(synthetic_root), "s.yaml")
    study = tmp_path / "study"
    held, free = sorted(run.run_id for run in expand(spec))
    assert locks.claim_run(StudyPaths(study).run_dir(held)) is not None  # another worker, alive
    run_grid(spec, study, build_report=False, collect=False)
    assert trained == [free]
    table = runs_table(spec, study).set_index("run_id")
    assert table.at[held, "status"] == "running"


def test_two_grid_processes_on_one_study_run_every_run_exactly_once(synthetic_root, tmp_path):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec_dict(synthetic_root, train_domains=["100", "400", "100+400"])))
    study = tmp_path / "study"
    command = [sys.executable, "-m", "histotoken.cli.main", "grid", str(spec_file), "--out", str(study),
               "--no-report"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs

    runs = pd.read_csv(study / "runs.csv")
    assert len(runs) == 3 and set(runs["status"]) == {"finished"}
    for run_id in runs["run_id"]:
        run_dir = StudyPaths(study).run_dir(run_id)
        assert len(attempts(run_dir)) == 1, run_id  # trained by one worker, once
        metrics = pd.read_csv(RunPaths(run_dir).metrics)
        assert metrics["epoch"].dropna().astype(int).tolist() == [1]
        assert not RunPaths(run_dir).claim.exists()
    results = pd.read_csv(study / "results.csv", dtype={"test_domain": str})
    assert not results.duplicated(["run_id", "test_domain", "metric"]).any()
    assert len(results[results["test_domain"] == "100"]) == 3 * 4  # runs x metrics


def test_submitit_local_jobs_run_two_at_a_time_and_collect_rebuilds_the_tables(synthetic_root, tmp_path):
    from histotoken.experiments.grid import prepare_study

    spec = spec_from_dict(spec_dict(synthetic_root), "s.yaml")
    study = tmp_path / "study"
    prepare_study(spec, study)
    submitted, ended = [], []
    settings = launcher_settings({"parallel": 2, "cpus_per_task": 1}, {}, "s.yaml")
    launch_runs(spec, study, expand(spec), "submitit-local", settings, poll_s=0.5,
                on_submit=submitted.append, on_done=lambda item, result, error: ended.append((result, error)))
    # both jobs were submitted before either ended: the window holds 2
    assert len(submitted) == 2 and len(ended) == 2
    assert [error for _, error in ended] == [None, None]
    assert sorted(result["outcome"] for result, _ in ended) == ["ran", "ran"]
    pids = {attempts(StudyPaths(study).run_dir(run.run_id))[0]["pid"] for run in expand(spec)}
    assert len(pids) == 2 and os.getpid() not in pids  # each run in its own job process

    assert not StudyPaths(study).runs_table.exists()  # jobs never write the study tables
    outcome = collect_study(spec, study, build_report=False, efficiency=False)
    assert list(outcome.runs["status"]) == ["finished", "finished"]
    results = pd.read_csv(study / "results.csv", dtype={"test_domain": str})
    assert len(results[results["test_domain"] == "100"]) == 2 * 4  # runs x metrics


def test_report_rebuilds_the_study_tables_from_the_run_folders(tmp_path, monkeypatch):
    import histotoken.reporting
    from histotoken.cli.main import main
    from tests.study_fixture import write_study

    study = write_study(tmp_path, with_images=False)
    before = pd.read_csv(study / "results.csv").sort_values(["run_id", "test_domain", "metric"], ignore_index=True)
    (study / "results.csv").unlink()
    (study / "runs.csv").unlink()

    def fake_report(study_dir, out=None, **kwargs):  # the tables are what this test checks, not the page
        (study / "report.html").write_text("<html></html>")
        return study / "report.html"

    monkeypatch.setattr(histotoken.reporting, "build_report", fake_report)
    assert main(["report", str(study)]) == 0
    after = pd.read_csv(study / "results.csv").sort_values(["run_id", "test_domain", "metric"], ignore_index=True)
    pd.testing.assert_frame_equal(after, before, check_dtype=False)
    runs = pd.read_csv(study / "runs.csv", keep_default_na=False)
    assert runs["status"].value_counts().to_dict() == {"finished": 8, "failed": 1}
    assert "loss is NaN" in runs.loc[runs["status"] == "failed", "error"].item()


def test_a_shard_trains_only_its_runs_and_leaves_the_tables_to_collect(synthetic_root, tmp_path, monkeypatch):
    import histotoken.engine.evaluate as evaluate
    import histotoken.engine.fit as fit

    trained = []
    monkeypatch.setattr(fit, "train", lambda config, run_dir, **kwargs: trained.append(Path(run_dir).name))
    monkeypatch.setattr(evaluate, "evaluate_run", lambda run_dir, domain, **kwargs: None)
    spec = spec_from_dict(spec_dict(synthetic_root, train_domains=["100", "400", "100+400"]), "s.yaml")
    study = tmp_path / "study"
    run_grid(spec, study, shard=(1, 2), collect=False)
    assert trained == [run.run_id for run in shard_runs(expand(spec), (1, 2))] and len(trained) == 1
    assert not StudyPaths(study).runs_table.exists()
