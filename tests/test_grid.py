"""The study grid: expansion, resumption, failures, tidy results, report, and the demo."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from histotoken.experiments.grid import RESULT_COLUMNS, run_grid, run_state
from histotoken.experiments.spec import expand, spec_from_dict

PROTOCOL = {"img_size": 32, "epochs": 1, "batch_size": 16, "precision": "32-true", "bootstrap": 100}


def spec_dict(data, **changes):
    raw = {
        "name": "t",
        "data": str(data),
        "tasks": ["subtype"],
        "models": ["resnet18"],
        "train_domains": ["100", "400"],
        "test_domains": ["100", "400"],
        "seeds": [0],
        "protocol": PROTOCOL,
        "efficiency": {"batch_size": 2, "rounds": 1},
    }
    raw.update(changes)
    return raw


def test_grid_expands_models_tasks_domains_and_seeds(tmp_path):
    spec = spec_from_dict(
        spec_dict(
            tmp_path, tasks=["binary", "subtype"], seeds=[0, 1],
            models=["resnet18", {"name": "cnnprune_vit_tiny", "kwargs": {"keep_ratio": 0.5}}],
            train_domains=["100", "400+100"],
        ),
        "spec.yaml",
    )
    runs = expand(spec)
    assert len(runs) == 2 * 2 * 2 * 2
    assert len({r.run_id for r in runs}) == len(runs)
    assert {r.train_domain for r in runs} == {"100", "100+400"}
    assert "cnnprune_vit_tiny-keep_ratio-0.5__binary__train100__seed1" in {r.run_id for r in runs}
    config = runs[0].config(spec, tmp_path / "split.csv")
    assert config.img_size == 32 and config.seed == 0 and config.splits.endswith("split.csv")


def test_folds_replace_seeds(tmp_path):
    spec = spec_from_dict(spec_dict(tmp_path, folds=3), "spec.yaml")
    assert [r.split_name for r in expand(spec)] == ["fold0", "fold0", "fold1", "fold1", "fold2", "fold2"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"protocol": {"seed": 3}}, "grid sets them per run"),
        ({"modles": ["resnet18"]}, "unknown keys"),
        ({"models": []}, "'models' must list"),
        ({"protocol": {"epochs": "ten"}}, "epochs='ten'"),
        ({"tasks": ["grading"]}, "task"),
        ({"train_domains": ["60"]}, "magnification 60"),
    ],
)
def test_bad_study_files_name_the_problem(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        spec_from_dict(spec_dict(tmp_path, **changes), "spec.yaml")


def test_grid_runs_resumes_and_survives_a_failing_run(synthetic_root, tmp_path):
    spec = spec_from_dict(spec_dict(synthetic_root, models=["resnet18", "no_such_model_xyz"]), "spec.yaml")
    study = tmp_path / "study"
    outcome = run_grid(spec, study, build_report=False)

    runs = pd.read_csv(study / "runs.csv", keep_default_na=False)
    assert list(runs["status"]) == ["finished", "finished", "failed", "failed"]
    assert "unknown model 'no_such_model_xyz'" in runs.loc[2, "error"]

    results = pd.read_csv(study / "results.csv")
    assert list(results.columns) == RESULT_COLUMNS
    # 2 finished runs x 2 test domains x 4 metrics
    assert len(results) == 16
    assert set(results["metric"]) == {"accuracy", "balanced_accuracy", "macro_f1", "patient_accuracy"}
    in_domain = results[(results.train_domain == 100) & (results.test_domain == 100) & (results.metric == "macro_f1")]
    evaluation = json.loads((study / "runs" / runs.loc[0, "run_id"] / "eval" / "100.json").read_text())
    assert in_domain["value"].item() == pytest.approx(evaluation["macro_f1"])
    assert in_domain["ci_low"].item() <= in_domain["value"].item() <= in_domain["ci_high"].item()

    # every run shares the one frozen split
    split = pd.read_csv(study / "splits" / "seed0.csv")
    for run_id in runs.loc[runs.status == "finished", "run_id"]:
        pd.testing.assert_frame_equal(pd.read_csv(study / "runs" / run_id / "splits.csv"), split)
    efficiency = pd.read_csv(study / "efficiency.csv")
    assert list(efficiency["model"]) == ["resnet18"]
    assert outcome.results_csv == study / "results.csv"

    # resume: finished runs are not retrained; a missing evaluation is redone
    first_run = study / "runs" / runs.loc[0, "run_id"]
    weights_time = (first_run / "checkpoints" / "best.safetensors").stat().st_mtime_ns
    (first_run / "eval" / "400.json").unlink()
    planned = {r.run_id: r for r in expand(spec)}
    assert run_state(study, planned[runs.loc[0, "run_id"]], spec) == "partial"
    run_grid(spec, study, build_report=False)
    assert (first_run / "eval" / "400.json").is_file()
    assert (first_run / "checkpoints" / "best.safetensors").stat().st_mtime_ns == weights_time

    dry = run_grid(spec, study, dry_run=True)
    assert list(dry.runs["state"]) == ["done", "done", "failed", "failed"]


def test_a_study_folder_refuses_a_different_protocol(synthetic_root, tmp_path):
    spec = spec_from_dict(spec_dict(synthetic_root, train_domains=["100"], test_domains=["100"]), "spec.yaml")
    run_grid(spec, tmp_path / "study", build_report=False)
    changed = spec_from_dict(
        spec_dict(synthetic_root, train_domains=["100"], test_domains=["100"], protocol={**PROTOCOL, "epochs": 2}),
        "spec.yaml",
    )
    with pytest.raises(ValueError, match="different protocol"):
        run_grid(changed, tmp_path / "study")


def test_demo_spec_runs_end_to_end_at_a_smaller_budget(tmp_path):
    from histotoken.cli.grid import resolve_spec_path
    from histotoken.experiments.demo import run_demo

    outcome = run_demo(
        tmp_path / "demo",
        resolve_spec_path("demo.yaml"),
        overrides={
            "synthetic": {"patients_per_class": 3, "images_per_patient": 1, "size": [64, 48],
                          "magnifications": [100, 400], "seed": 0},
            "models": ["resnet18", "tokenlearner_vit_tiny:patch_size=8,num_tokens=4"],
            "train_domains": ["100", "100+400"],
            "protocol": {"img_size": 32, "epochs": 1, "batch_size": 16, "bootstrap": 100},
            "efficiency": {"batch_size": 2, "rounds": 1},
            "explain": {"n": 4, "steps": 4, "random_orders": 1},
        },
    )
    assert outcome.report is not None and outcome.report.is_file()
    html = outcome.report.read_text()
    assert "synthetic" in html.lower()
    assert "What the models look at" in html  # the demo explains every run, and the report shows it
    assert (outcome.runs["status"] == "finished").all()
    results = pd.read_csv(outcome.results_csv)
    assert set(results["test_domain"].astype(str)) == {"100", "400", "100+400"}


def _full_spec_dict(root) -> dict:
    """A spec with every optional block the grid writes back, including ``explain:``."""
    return spec_dict(
        root / "data folder é",
        tasks=["binary", "subtype"],
        models=["resnet18", {"name": "cnnprune_vit_tiny", "kwargs": {"keep_ratio": 0.5}}],
        train_domains=["100", "100+400"],
        test_domains=["100", "400", "100+400"],
        seeds=[0, 3],
        split={"scheme": "patient", "val": 0.2, "test": 0.2},
        factors={"balancing": ["none", "class_weights"]},
        reference_model="cnnprune_vit_tiny:keep_ratio=0.5",
        launcher={"partition": "gpu", "timeout_min": 30},
        data_format="breakhis",
        explain={"domains": ["100"], "n": 4, "steps": 4, "random_orders": 1},
    )


@pytest.mark.parametrize("explain", [{"domains": ["100"], "n": 4, "steps": 4, "random_orders": 1}, True, None])
def test_a_spec_the_grid_writes_reads_back_equal(tmp_path, explain):
    from histotoken.experiments.spec import dump_spec

    raw = _full_spec_dict(tmp_path)
    raw["explain"] = explain
    spec = spec_from_dict(raw, "spec.yaml")
    written = tmp_path / "spec.yaml"
    written.write_text(dump_spec(spec), encoding="utf-8")
    from histotoken.experiments.spec import load_spec

    again = load_spec(written)
    assert again == spec
    assert bool(again.explain) == bool(explain)


def test_report_rebuilds_the_tables_of_a_study_whose_spec_has_an_explain_block(tmp_path):
    """``histotoken report STUDY`` re-reads the spec.yaml the grid wrote (it failed on ``explain: {enabled}``)."""
    from histotoken.experiments.grid import collect_tables
    from histotoken.experiments.spec import dump_spec
    from histotoken.formats import StudyPaths

    spec = spec_from_dict(_full_spec_dict(tmp_path), "spec.yaml")
    study = tmp_path / "study"
    study.mkdir()
    StudyPaths(study).spec.write_text(dump_spec(spec), encoding="utf-8")
    runs = collect_tables(study)
    assert len(runs) == len(expand(spec)) and set(runs["status"]) == {"pending"}


def test_a_spec_file_with_the_old_enabled_marker_still_reads(tmp_path):
    raw = spec_dict(tmp_path, explain={"enabled": True, "n": 4})
    assert spec_from_dict(raw, "spec.yaml").explain == {"enabled": True, "n": 4}
    assert spec_from_dict({**raw, "explain": {"enabled": False, "n": 4}}, "spec.yaml").explain == {}


def test_a_test_domain_missing_from_the_data_stops_the_study_before_any_training(learnable_root, tmp_path):
    """learnable_root has 100x and 400x only: asking for 200x as a test domain is refused up front,
    not found after every model has trained (and no run folder is started)."""
    spec = spec_from_dict(spec_dict(learnable_root, train_domains=["100"], test_domains=["100", "200"]), "spec.yaml")
    study = tmp_path / "study"
    with pytest.raises(ValueError, match=r"nothing was trained.*domain 200 has no images in the test split"):
        run_grid(spec, study, build_report=False)
    assert not (study / "runs").exists() or not any((study / "runs").iterdir())
