"""SLURM jobs that survive their time limit and are watched closely, without a SLURM cluster.

A job near its time limit checkpoints and requeues itself (submitit's checkpointable jobs; the
local executor requeues the same way a SLURM cluster does); the grid reads job states from one
squeue/sacct call per poll (parsed from the text those commands print) and exits non-zero
naming the runs whose jobs ended before they started. ``tests/test_slurm_real.py`` runs the
same paths on a real single-node SLURM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import types
from pathlib import Path

import pandas as pd
import pytest
import yaml

from histotoken.experiments import locks
from histotoken.experiments.grid import prepare_study
from histotoken.experiments.launch import (
    JobState,
    RequeueLimitReached,
    RunJob,
    SlurmStates,
    SubmittedRun,
    launcher_settings,
    make_executor,
    parse_job_states,
    wait_slurm,
)
from histotoken.experiments.spec import expand, spec_from_dict
from histotoken.formats import RunPaths, StudyPaths
from tests import study_spec
from tests.study_spec import PROTOCOL, write_script


def one_run_study(data, tmp_path, **changes):
    """(spec, study folder, its one planned run) of a prepared one-run study."""
    spec = spec_from_dict(spec_dict(data, **changes), "s.yaml")
    study = tmp_path / "study"
    prepare_study(spec, study)
    (run,) = expand(spec)
    return spec, study, run


def spec_dict(data, **changes):
    return study_spec.spec_dict(data, **{"name": "requeue", "tasks": ["binary"], "train_domains": ["100"], **changes})


@pytest.fixture
def kept_tokens(monkeypatch):
    """Claims kept for requeued jobs, private to one test."""
    monkeypatch.setattr(locks, "_KEPT_TOKENS", set())
    return locks._KEPT_TOKENS


# --------------------------------------------------------------------------- checkpoint and requeue


def test_checkpoint_requeues_an_unfinished_run_as_the_same_job_one_requeue_later(synthetic_root, tmp_path):
    from submitit.helpers import DelayedSubmission

    spec, study, run = one_run_study(synthetic_root, tmp_path)
    job = RunJob(max_requeues=3)
    arguments = (spec, str(study), run.run_id, 600.0)

    again = job.checkpoint(*arguments)
    assert isinstance(again, DelayedSubmission)
    assert isinstance(again.function, RunJob) and again.args == arguments
    assert again.function.token == job.token  # it takes back the claim this job keeps
    assert again.function.requeues == 1 and again.function.max_requeues == 3
    assert job.requeued


def test_checkpoint_does_not_requeue_a_run_that_is_done(synthetic_root, tmp_path):
    spec, study, run = one_run_study(synthetic_root, tmp_path)
    study_spec.mark_finished(RunPaths(StudyPaths(study).run_dir(run.run_id)))
    job = RunJob()
    assert job.checkpoint(spec, str(study), run.run_id, 600.0) is None
    assert not job.requeued


def test_a_run_requeued_max_requeues_times_is_failed_asking_for_more_time(synthetic_root, tmp_path):
    spec, study, run = one_run_study(synthetic_root, tmp_path)
    with pytest.raises(RequeueLimitReached, match="--timeout-min") as raised:
        RunJob(max_requeues=2, requeues=2).checkpoint(spec, str(study), run.run_id, 600.0)
    assert "3 times" in str(raised.value) and "\n" not in str(raised.value)


def test_a_kept_claim_is_taken_back_by_its_own_job_and_by_no_other_worker(tmp_path, kept_tokens):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # a claim held on another node (its pid cannot be checked from here) with a fresh heartbeat
    RunPaths(run_dir).claim.write_text(json.dumps({"host": "node-a", "pid": 1, "started": time.time(), "token": "T1"}))
    assert locks.claim_run(run_dir, stale_after_s=600) is None
    assert locks.claim_run(run_dir, stale_after_s=600, token="another") is None

    again = locks.claim_run(run_dir, stale_after_s=600, token="T1", details={"job_id": "42_0", "requeues": 1})
    assert again is not None
    record = json.loads(RunPaths(run_dir).claim.read_text())
    assert record["token"] == "T1" and record["pid"] == os.getpid() and record["job_id"] == "42_0"

    locks.keep("T1")
    locks.release(again)  # the job is requeued: the claim stays for its next start
    assert locks.read_claim(run_dir)[0]["token"] == "T1"
    kept_tokens.clear()
    locks.release(again)
    assert locks.read_claim(run_dir) is None


def test_a_job_warned_of_its_time_limit_requeues_and_resumes_without_losing_an_epoch(
    synthetic_root, tmp_path, kept_tokens
):
    """USR2 (what SLURM sends before the time limit) to a running job: it saves, requeues, resumes, finishes."""
    protocol = {**PROTOCOL, "epochs": 8, "early_stopping_patience": 100}
    spec = spec_from_dict(spec_dict(synthetic_root, protocol=protocol), "s.yaml")
    study = tmp_path / "study"
    prepare_study(spec, study)
    (run,) = expand(spec)
    paths = RunPaths(StudyPaths(study).run_dir(run.run_id))
    executor = make_executor("submitit-local", tmp_path / "submitit", launcher_settings({"cpus_per_task": 1}, {}, "s"),
                             "requeue-test")
    job = executor.submit(RunJob(max_requeues=2), spec, str(study), run.run_id, 600.0)

    deadline = time.time() + 240
    while not (paths.metrics.is_file() and len(pd.read_csv(paths.metrics)) >= 2):
        assert time.time() < deadline and not job.done(), "the job did not finish two epochs in time"
        time.sleep(0.05)
    before = pd.read_csv(paths.metrics)
    worker_pid = locks.read_claim(paths.root)[0]["pid"]
    os.kill(worker_pid, signal.SIGUSR2)  # the job's own process, as slurmstepd signals it

    result = job.result()
    assert result["outcome"] == "ran" and result["error"] is None
    attempts = [json.loads(line) for line in paths.attempts.read_text().splitlines()]
    assert [attempt["requeues"] for attempt in attempts] == [0, 1]
    assert attempts[0]["token"] == attempts[1]["token"] and attempts[0]["pid"] != attempts[1]["pid"]
    status = json.loads(paths.status.read_text())
    assert status["state"] == "finished"
    after = pd.read_csv(paths.metrics)
    assert after["epoch"].tolist() == list(range(1, 9))  # every epoch once
    done_before = after[after["epoch"] <= before["epoch"].max()]
    assert done_before["epoch_time_s"].tolist() == before["epoch_time_s"].tolist()  # not trained again
    log = "".join(path.read_text() for path in (tmp_path / "submitit").rglob("*.err"))
    assert "resuming stage" in log
    assert locks.read_claim(paths.root) is None  # released once the run finished


# --------------------------------------------------------------------------- squeue / sacct


# squeue -h -r -t all -o "%i|%T|%r", recorded on a single-node SLURM 22.05 (an array cancelled, then gone)
SQUEUE_RECORDED = "1_0|COMPLETING|None\n1_1|RUNNING|None\n"
SQUEUE_RECORDED_LATER = "1_0|CANCELLED|None\n1_1|RUNNING|None\n"
# sacct -n -P -X -o JobID,State,Reason, as sacct prints it on clusters with accounting: pending array tasks
# not yet split, "CANCELLED by UID", job steps (without -X), a reason with the unavailable nodes
SACCT = """42_0|CANCELLED by 1000|None
42_1|TIMEOUT|None
42_1.batch|CANCELLED|
42_[2-4%2]|PENDING|Resources
43|OUT_OF_MEMORY|None
44|PENDING|ReqNodeNotAvail, UnavailableNodes:node[01-02]
45|PENDING|QOSMaxCpuPerJobLimit
46|PENDING|Priority
"""


def test_squeue_and_sacct_lines_are_read_as_job_states():
    assert parse_job_states(SQUEUE_RECORDED) == {"1_0": JobState("COMPLETING"), "1_1": JobState("RUNNING")}
    assert parse_job_states(SQUEUE_RECORDED_LATER)["1_0"].ended
    states = parse_job_states(SACCT)
    assert sorted(states) == ["42_0", "42_1", "42_2", "42_3", "42_4", "43", "44", "45", "46"]
    assert states["42_0"] == JobState("CANCELLED") and states["42_1"] == JobState("TIMEOUT")  # not the step's
    assert states["42_3"] == JobState("PENDING", "Resources") and not states["42_3"].ended
    assert states["43"].ended and not parse_job_states(SQUEUE_RECORDED)["1_0"].ended
    # pending for a reason that waiting will not change, and for ones that pass
    assert "down, drained" in states["44"].stuck()
    assert states["45"].stuck() is not None
    assert states["46"].stuck() is None and states["42_3"].stuck() is None
    assert "--cpus-per-task" in JobState("PENDING", "PartitionConfig").stuck()
    # how an ended job is named: a queueing reason left over from pending is dropped, a cause is kept
    assert JobState("CANCELLED", "Resources").describe() == "CANCELLED"
    assert JobState("FAILED", "NonZeroExitCode").describe() == "FAILED (NonZeroExitCode)"


def answers(**by_command):
    """A stand-in for subprocess.run: the text each command prints (stdout, stderr, returncode)."""
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        stdout, stderr, code = by_command[command[0]]
        return subprocess.CompletedProcess(command, code, stdout, stderr)

    return run, calls


def test_one_squeue_call_answers_for_every_job_and_sacct_for_those_it_no_longer_lists():
    run, calls = answers(squeue=("7_0|RUNNING|None\n", "", 0), sacct=("7_1|CANCELLED by 0|None\n", "", 0))
    poller = SlurmStates(run)
    poller.sacct = True
    assert poller.poll(["7_0", "7_1", "8"]) == {"7_0": JobState("RUNNING"), "7_1": JobState("CANCELLED"),
                                                "8": JobState("GONE")}
    assert [command[0] for command in calls] == ["squeue", "sacct"]
    assert calls[0][-2:] == ["-j", "7,8"]  # one call: the array ids


def test_without_accounting_the_poll_uses_squeue_alone():
    run, calls = answers(squeue=("", "slurm_load_jobs error: Invalid job id specified\n", 1),
                         sacct=("Slurm accounting storage is disabled\n", "", 0))
    poller = SlurmStates(run)
    poller.sacct = True
    assert poller.poll(["9_0"]) == {"9_0": JobState("GONE")}
    assert not poller.sacct  # not asked again
    poller.poll(["9_0"])
    assert [command[0] for command in calls] == ["squeue", "sacct", "squeue"]
    busy, _ = answers(squeue=("", "slurm_load_jobs error: Socket timed out on send/recv operation\n", 1))
    assert SlurmStates(busy).poll(["9_0"]) is None  # no answer is not an end


def fake_job(folder: Path, job_id: str):
    paths = types.SimpleNamespace(folder=folder, result_pickle=folder / f"{job_id}_result.pkl")
    folder.mkdir(parents=True, exist_ok=True)
    return types.SimpleNamespace(job_id=job_id, paths=paths)


def test_a_cancelled_job_is_done_within_one_poll_and_a_stuck_one_is_reported_once(tmp_path):
    runs = [types.SimpleNamespace(run_id=f"run-{index}") for index in range(2)]
    submitted = [SubmittedRun(run, fake_job(tmp_path / f"{index}", f"5_{index}")) for index, run in enumerate(runs)]
    polls = iter([
        {"5_0": JobState("CANCELLED"), "5_1": JobState("PENDING", "PartitionConfig")},
        {"5_1": JobState("PENDING", "PartitionConfig")},
        {"5_1": JobState("CANCELLED")},
    ])
    done, stuck, asked = [], [], []

    def states_of(job_ids):
        asked.append(list(job_ids))
        return next(polls)

    wait_slurm(submitted, lambda item, result, error: done.append((item.job_id, error)), 0.0, states_of,
               lambda item, message: stuck.append((item.job_id, message)))
    assert asked == [["5_0", "5_1"], ["5_1"], ["5_1"]]
    assert done[0][0] == "5_0" and done[0][1].startswith("CANCELLED")  # after the first poll
    assert [job for job, _ in stuck] == ["5_1"] and "PartitionConfig" in stuck[0][1]
    assert "`scancel 5_1`" in stuck[0][1]  # the stuck task, not the whole array
    assert [job for job, _ in done] == ["5_0", "5_1"]


# --------------------------------------------------------------------------- the grid's outcome


def fake_slurm(bin_dir: Path, squeue_text: str) -> None:
    """sbatch that accepts an array as job 42; squeue (and sacct, in submitit's own format) that say how it ended."""
    write_script(bin_dir, "srun", "exit 0\n")
    write_script(bin_dir, "sinfo", "printf '4 7821 (null)\\n'\n")
    write_script(bin_dir, "sbatch", "echo 'Submitted batch job 42'\n")
    write_script(bin_dir, "squeue", f"printf '{squeue_text}'\n")
    sacct = squeue_text.replace("|None", "|node1")
    write_script(bin_dir, "sacct", f"printf 'JobID|State|NodeList\\n{sacct}'\n")


def test_a_grid_whose_jobs_were_all_cancelled_exits_non_zero_naming_the_runs(synthetic_root, tmp_path, monkeypatch,
                                                                            capsys):
    from histotoken.cli.main import main

    fake_slurm(tmp_path / "bin", "42_0|CANCELLED|None\\n42_1|CANCELLED|None\\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec_dict(synthetic_root, train_domains=["100", "400"])))
    study = tmp_path / "study"
    code = main(["grid", str(spec_file), "--out", str(study), "--launcher", "slurm", "--no-report"])
    out = capsys.readouterr().out
    assert code == 1
    named = [line for line in out.splitlines() if line.startswith("DID NOT RUN")]
    run_ids = sorted(run.run_id for run in expand(spec_from_dict(spec_dict(synthetic_root, train_domains=["100", "400"]), "s")))
    assert sorted(line.split()[3].rstrip(":") for line in named) == run_ids
    assert all("CANCELLED" in line and "re-run the same command" in line for line in named)
    assert pd.read_csv(study / "runs.csv")["status"].tolist() == ["pending", "pending"]


def test_a_job_that_timed_out_before_its_run_started_says_to_give_more_time(synthetic_root, tmp_path, monkeypatch,
                                                                           capsys):
    from histotoken.cli.main import main

    fake_slurm(tmp_path / "bin", "42|TIMEOUT|None\\n")  # one run: a plain job, not an array
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec_dict(synthetic_root)))
    code = main(["grid", str(spec_file), "--out", str(tmp_path / "study"), "--launcher", "slurm", "--no-report",
                 "--timeout-min", "3"])
    out = capsys.readouterr().out
    assert code == 1
    (line,) = [line for line in out.splitlines() if line.startswith("DID NOT RUN")]
    assert "TIMEOUT" in line and "--timeout-min 3" in line and "more time" in line


@pytest.mark.parametrize("minutes", [1, 1.5])
def test_a_time_limit_too_short_to_start_is_refused_in_one_line(minutes):
    with pytest.raises(ValueError, match="--timeout-min 2 or more") as raised:
        launcher_settings({}, {"timeout_min": minutes}, "s.yaml")
    assert "\n" not in str(raised.value)
