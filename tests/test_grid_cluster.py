"""Grids on clusters: interruptions, resources that fit the nodes (sinfo), sbatch errors, the collect hint.

No real SLURM here: ``sinfo`` and ``sbatch`` are small shell scripts on PATH that print what a real
cluster printed, and jobs run through submitit's local executor.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from histotoken.experiments import locks
from histotoken.experiments.grid import collect_study, execute_run, prepare_study, run_state
from histotoken.experiments.launch import (
    LauncherSettings,
    NodeResources,
    fill_defaults,
    launch_runs,
    launcher_settings,
    make_executor,
    parse_sinfo,
    query_nodes,
)
from histotoken.experiments.spec import expand, spec_from_dict
from histotoken.formats import RunPaths, StudyPaths
from tests import study_spec
from tests.study_spec import write_script


def spec_dict(data, **changes):
    return study_spec.spec_dict(data, **{"name": "cluster", **changes})


def mark_interrupted(study: Path, run_id: str, signal_name: str = "SIGTERM") -> None:
    """status.json as the engine leaves it when a signal stops training (engine/fit.py)."""
    paths = RunPaths(StudyPaths(study).run_dir(run_id))
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.status.write_text(json.dumps({"state": "interrupted", "error": f"RunInterrupted: received {signal_name}",
                                        "stages_done": []}))


# --------------------------------------------------------------------------- interruptions


def test_an_interrupted_run_is_interrupted_in_runs_csv_and_the_dry_run(synthetic_root, tmp_path, capsys):
    from histotoken.cli.main import main

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec_dict(synthetic_root)))
    spec = spec_from_dict(spec_dict(synthetic_root), str(spec_file))
    study = tmp_path / "study"
    prepare_study(spec, study)
    stopped, untouched = sorted(run.run_id for run in expand(spec))
    mark_interrupted(study, stopped)

    assert run_state(study, next(r for r in expand(spec) if r.run_id == stopped), spec) == "interrupted"
    runs = collect_study(spec, study, build_report=False, efficiency=False).runs.set_index("run_id")
    assert runs.at[stopped, "status"] == "interrupted"  # not "failed"
    assert runs.at[untouched, "status"] == "pending"
    written = pd.read_csv(study / "runs.csv", keep_default_na=False).set_index("run_id")
    assert written.at[stopped, "status"] == "interrupted"

    assert main(["grid", str(spec_file), "--out", str(study), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 interrupted (resumable)" in out and "failed" not in out


@pytest.mark.parametrize("signal_name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_launched_grid_whose_job_was_interrupted_exits_with_the_signal_code(
    synthetic_root, tmp_path, monkeypatch, capsys, signal_name, code
):
    import histotoken.experiments.launch as launch
    from histotoken.cli.main import main

    def interrupted_jobs(spec, study_dir, runs, kind, settings, wait=True, on_submit=None, on_done=None, **kwargs):
        submitted = []
        for run in runs:  # what a job stopped by the scheduler leaves behind, and what submitit reports
            mark_interrupted(Path(study_dir), run.run_id, signal_name)
            item = launch.SubmittedRun(run, type("Job", (), {"job_id": "7"})())
            on_done(item, None, f"RunInterrupted: received {signal_name}")
            submitted.append(item)
        return submitted

    monkeypatch.setattr(launch, "launch_runs", interrupted_jobs)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec_dict(synthetic_root, train_domains=["100"])))
    study = tmp_path / "study"
    command = ["grid", str(spec_file), "--out", str(study), "--launcher", "submitit-local", "--no-report"]
    assert main(command) == code
    out = capsys.readouterr().out
    assert "INTERRUPTED" in out and "FAILED" not in out
    assert pd.read_csv(study / "runs.csv")["status"].tolist() == ["interrupted"]


def test_the_report_lists_an_interrupted_run_as_unfinished_not_failed(tmp_path):
    from histotoken.experiments.grid import collect_tables
    from histotoken.reporting.report import build_report
    from tests.study_fixture import write_study

    study = write_study(tmp_path, with_images=False)
    failed_run = pd.read_csv(study / "runs.csv").query("status == 'failed'")["run_id"].item()
    mark_interrupted(study, failed_run)  # the same run, stopped by a signal instead
    runs = collect_tables(study)
    assert runs.set_index("run_id").at[failed_run, "status"] == "interrupted"
    html = build_report(study).read_text(encoding="utf-8")
    assert "No run failed" in html
    assert "status: interrupted" in html


# --------------------------------------------------------------------------- small fixes


def test_the_printed_collect_hint_runs_as_printed(synthetic_root, tmp_path, monkeypatch, capsys):
    import histotoken.engine.evaluate as evaluate
    import histotoken.engine.fit as fit
    from histotoken.cli.main import build_parser, main

    monkeypatch.setattr(fit, "train", lambda config, run_dir, **kwargs: None)
    monkeypatch.setattr(evaluate, "evaluate_run", lambda run_dir, domain, **kwargs: None)
    spec_file = tmp_path / "my spec.yaml"  # a space, so the hint must quote
    spec_file.write_text(yaml.safe_dump(spec_dict(tmp_path / "not-the-data")))  # --data overrides it
    study = tmp_path / "study"
    assert main(["grid", str(spec_file), "--data", str(synthetic_root), "--data-format", "breakhis",
                 "--out", str(study), "--shard", "0/2", "--no-report"]) == 0
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    words = shlex.split(hint)
    assert words[0] == "histotoken"
    parsed = build_parser().parse_args(words[1:])
    assert parsed.collect and parsed.spec == str(spec_file) and parsed.out == str(study)
    assert parsed.data == str(synthetic_root) and parsed.data_format == "breakhis"

    assert main(words[1:]) == 0  # as printed
    assert len(pd.read_csv(study / "runs.csv")) == 2


def test_a_job_that_finds_its_run_finished_adds_no_attempt(synthetic_root, tmp_path, monkeypatch):
    import histotoken.engine.fit as fit

    monkeypatch.setattr(fit, "train", lambda *args, **kwargs: pytest.fail("a finished run was trained again"))
    spec = spec_from_dict(spec_dict(synthetic_root, train_domains=["100"]), "s.yaml")
    study = tmp_path / "study"
    splits = prepare_study(spec, study)
    (run,) = expand(spec)
    paths = RunPaths(StudyPaths(study).run_dir(run.run_id))
    study_spec.mark_finished(paths)

    outcome = execute_run(spec, study, run, splits[run.split_name])
    assert outcome.outcome == "done"
    assert not paths.attempts.exists()
    assert locks.read_claim(paths.root) is None  # and its claim is released


@pytest.mark.parametrize("source", ["block", "flag"])
def test_a_fractional_claim_timeout_is_accepted(source):
    block, flags = ({"claim_timeout_min": 0.5}, {}) if source == "block" else ({}, {"claim_timeout_min": 0.5})
    assert launcher_settings(block, flags, "s.yaml").claim_timeout_s == 30.0


@pytest.mark.parametrize("value", [0, -1, "soon"])
def test_a_claim_timeout_that_is_not_positive_is_refused(value):
    with pytest.raises(ValueError, match="claim_timeout_min"):
        launcher_settings({"claim_timeout_min": value}, {}, "s.yaml")


def test_launcher_python_chooses_the_interpreter_that_runs_the_job(tmp_path):
    # a wrapper interpreter, as a cluster's own Python (or a container) would be
    marker = "HISTOTOKEN_TEST_INTERPRETER"
    wrapper = write_script(tmp_path / "bin", "python-on-node", f'export {marker}=wrapper\nexec "{sys.executable}" "$@"\n')
    settings = launcher_settings({"python": str(wrapper), "cpus_per_task": 1}, {}, "s.yaml")
    executor = make_executor("submitit-local", tmp_path / "submitit", settings, "python-check")
    job = executor.submit(os.getenv, marker)  # read in the job process
    assert job.result() == "wrapper"


def test_an_empty_split_is_named_as_empty():
    from histotoken.data.domains import select_domain

    empty = pd.DataFrame({"path": [], "magnification": []})
    with pytest.raises(ValueError, match="the val split of s.csv is empty") as raised:
        select_domain(empty, "100", "the val split of s.csv")
    assert "magnification" not in str(raised.value)


# --------------------------------------------------------------------------- resources from sinfo

# `sinfo -h -o "%c %m %G"` as clusters print it (a CPU-only node; a partition with two node kinds)
SINFO_CPU_ONLY = "4 7821 (null)\n"
SINFO_GPU_PARTITION = "64+ 515000 gpu:a100:4(S:0-1)\n32 191000 gpu:v100:2,mps:200\n"


def test_sinfo_lines_are_read_as_cpus_memory_and_gpus():
    assert parse_sinfo(SINFO_CPU_ONLY) == [NodeResources(cpus=4, mem_mb=7821, gpus=0)]
    assert parse_sinfo(SINFO_GPU_PARTITION) == [NodeResources(64, 515000, 4), NodeResources(32, 191000, 2)]
    assert parse_sinfo("") == []


def test_without_node_information_a_job_asks_for_no_gpu_and_few_cpus():
    settings = fill_defaults(launcher_settings({}, {}, "s.yaml"), None)
    assert settings.gpus_per_task == 0 and settings.cpus_per_task == 2


def test_defaults_fit_what_a_node_has():
    cpu_only = fill_defaults(LauncherSettings(), parse_sinfo(SINFO_CPU_ONLY))
    assert (cpu_only.gpus_per_task, cpu_only.cpus_per_task) == (0, 4)  # all 4 of a small node, not 8
    gpu = fill_defaults(LauncherSettings(), parse_sinfo(SINFO_GPU_PARTITION))
    assert (gpu.gpus_per_task, gpu.cpus_per_task) == (1, 8)
    chosen = fill_defaults(LauncherSettings(gpus_per_task=2, cpus_per_task=16), parse_sinfo(SINFO_GPU_PARTITION))
    assert (chosen.gpus_per_task, chosen.cpus_per_task) == (2, 16)  # what was asked for, when a node has it


@pytest.mark.parametrize("asked, option", [
    ({"gpus_per_task": 1}, "--gpus-per-task 0"),
    ({"cpus_per_task": 8}, "--cpus-per-task 4"),
    ({"mem_gb": 64}, "--mem-gb 7"),
])
def test_a_request_no_node_can_meet_is_refused_with_the_option_to_change(asked, option):
    with pytest.raises(ValueError, match=option):
        fill_defaults(LauncherSettings(partition="cpu", **asked), parse_sinfo(SINFO_CPU_ONLY))


def test_sinfo_is_asked_about_the_partition(tmp_path, monkeypatch):
    asked = tmp_path / "asked.txt"
    bin_dir = tmp_path / "bin"
    write_script(bin_dir, "sinfo", f'echo "$@" > "{asked}"\nprintf "{SINFO_CPU_ONLY}"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert query_nodes("cpu") == [NodeResources(4, 7821, 0)]
    assert asked.read_text().split() == ["-h", "-o", "%c", "%m", "%G", "-p", "cpu"]
    write_script(bin_dir, "sinfo", "echo 'slurm_load_partitions: Unable to contact slurm controller' >&2\nexit 1\n")
    assert query_nodes("cpu") is None


def test_an_sbatch_refusal_becomes_one_line_naming_the_option(synthetic_root, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    write_script(bin_dir, "srun", "exit 0\n")  # submitit looks for it to know it is on a SLURM cluster
    write_script(bin_dir, "sinfo", "exit 1\n")  # nothing known about the nodes
    write_script(bin_dir, "sbatch", "echo 'sbatch: error: Invalid generic resource (gres) specification' >&2\n"
                                    "exit 1\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    spec = spec_from_dict(spec_dict(synthetic_root), "s.yaml")
    settings = launcher_settings({"gpus_per_task": 1}, {}, "s.yaml")
    with pytest.raises(ValueError) as raised:
        launch_runs(spec, tmp_path / "study", expand(spec), "slurm", settings, wait=False)
    message = str(raised.value)
    assert "\n" not in message
    assert "Invalid generic resource (gres) specification" in message
    assert "--gpus-per-task 0" in message and "gpus_per_task: 0" in message


def test_the_slurm_launcher_off_a_cluster_says_where_to_run(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no srun, sbatch or sinfo
    spec = spec_from_dict(spec_dict(synthetic_root), "s.yaml")
    with pytest.raises(ValueError, match="login node"):
        launch_runs(spec, tmp_path / "study", expand(spec), "slurm", launcher_settings({}, {}, "s.yaml"), wait=False)
