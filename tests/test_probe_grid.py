"""`probes:` as a grid factor: run ids and labels, probe runs through `train --probe`'s path (predictions as
scikit-learn's on the same features and split), and the report's mean ± SD over seeds checked with numpy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import histotoken.models  # noqa: F401  (registers vit_mini_patch4_32)
from histotoken.experiments.grid import run_grid, run_state
from histotoken.experiments.spec import expand, spec_from_dict
from histotoken.reporting import tables

MODEL = "vit_mini_patch4_32"
PROTOCOL = {"img_size": 32, "epochs": 1, "batch_size": 16, "precision": "32-true", "bootstrap": 50}
CLASSES = ["benign", "malignant"]


def spec_dict(data, **changes):
    raw = {
        "name": "probes", "data": str(data), "tasks": ["binary"], "models": [MODEL],
        "train_domains": ["100"], "test_domains": ["100", "400"], "seeds": [0, 1],
        "protocol": PROTOCOL, "efficiency": {"batch_size": 2, "rounds": 1}, "probes": ["none", "linear"],
    }
    raw.update(changes)
    return raw


def test_probes_are_a_factor_of_run_ids_and_labels(tmp_path):
    spec = spec_from_dict(spec_dict(tmp_path, probes=["none", "linear", "knn"], seeds=[0]), "spec.yaml")
    runs = expand(spec)
    assert [r.run_id for r in runs] == [
        f"{MODEL}__binary__train100__finetune__seed0",
        f"{MODEL}__binary__train100__probe-linear__seed0",
        f"{MODEL}__binary__train100__probe-knn__seed0",
    ]
    assert [r.probe for r in runs] == [None, "linear", "knn"]
    assert [r.label(spec) for r in runs] == [MODEL, f"{MODEL} [probe=linear]", f"{MODEL} [probe=knn]"]
    # without probes: fine-tuning, and the run ids of earlier studies
    plain = spec_from_dict({k: v for k, v in spec_dict(tmp_path, seeds=[0]).items() if k != "probes"}, "spec.yaml")
    assert [r.run_id for r in expand(plain)] == [f"{MODEL}__binary__train100__seed0"]
    # the spec file written into the study reads back with its probes
    assert spec_from_dict(spec.to_dict(), "spec.yaml").probes == ("none", "linear", "knn")


@pytest.mark.parametrize("probes, message", [
    (["linear", "svm"], r"unknown probe\(s\) \['svm'\].*none = fine-tune"),
    (["linear", "linear"], "lists a value twice"),
    ([], "must list at least one"),
])
def test_bad_probes_name_the_problem(tmp_path, probes, message):
    with pytest.raises(ValueError, match=f"spec.yaml: .*{message}"):
        spec_from_dict(spec_dict(tmp_path, probes=probes), "spec.yaml")


def test_dry_run_lists_probe_runs(tmp_path):
    spec = spec_from_dict(spec_dict(tmp_path), "spec.yaml")
    dry = run_grid(spec, tmp_path / "study", dry_run=True)
    assert dry.runs["run_id"].str.contains("__probe-linear__").sum() == 2
    assert dry.runs["run_id"].str.contains("__finetune__").sum() == 2
    assert set(dry.runs["state"]) == {"pending"}


@pytest.fixture(scope="module")
def probe_study(learnable_root, tmp_path_factory):
    spec = spec_from_dict(spec_dict(learnable_root), "spec.yaml")
    study = tmp_path_factory.mktemp("probe_grid") / "study"
    outcome = run_grid(spec, study, build_report=True)
    return study, outcome


def _linear_reference(run: Path, test_magnification: int) -> np.ndarray:
    """A scikit-learn linear probe fitted here on the run's features (read with h5py) and frozen split."""
    features_dir = Path(yaml.safe_load((run / "config.yaml").read_text())["features"])
    with h5py.File(features_dir / "features.h5", "r") as handle:
        keys = [v.decode() for v in handle["keys"][()]]
        matrix = handle["features"][()]
    row = {key: i for i, key in enumerate(keys)}
    split = pd.read_csv(run / "splits.csv")
    train = split[(split["split"] == "train") & (split["magnification"] == 100)]
    test = split[(split["split"] == "test") & (split["magnification"] == test_magnification)]
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    probe.fit(matrix[[row[p] for p in train["path"]]], train["label"].map(CLASSES.index).to_numpy())
    return probe.predict(matrix[[row[p] for p in test["path"]]])


def test_grid_probe_runs_predict_as_scikit_learn_on_every_test_domain(probe_study):
    study, outcome = probe_study
    runs = pd.read_csv(study / "runs.csv", keep_default_na=False)
    assert set(runs["status"]) == {"finished"}
    assert set(runs["model"]) == {MODEL, f"{MODEL} [probe=linear]"}
    for run_id in runs.loc[runs["run_id"].str.contains("probe-linear"), "run_id"]:
        run = study / "runs" / run_id
        assert not (run / "checkpoints").exists()  # the probe path, not fine-tuning
        for magnification in (100, 400):
            predictions = pd.read_csv(run / "eval" / f"{magnification}.predictions.csv")
            np.testing.assert_array_equal(predictions["prediction"].to_numpy(), _linear_reference(run, magnification))
            assert json.loads((run / "eval" / f"{magnification}.json").read_text())["probe"]["kind"] == "linear"
    for run_id in runs.loc[runs["run_id"].str.contains("finetune"), "run_id"]:
        assert (study / "runs" / run_id / "checkpoints" / "best.safetensors").is_file()


def _per_seed_values(study: Path) -> pd.DataFrame:
    """metric values read straight from every run's eval/<domain>.json (not from results.csv)."""
    runs = pd.read_csv(study / "runs.csv", keep_default_na=False, dtype=str)
    rows = []
    for run in runs.itertuples():
        for path in sorted((study / run.run_dir / "eval").glob("*.json")):
            evaluation = json.loads(path.read_text())
            for metric in tables.METRICS:
                rows.append({"model": run.model, "test": evaluation["domain"], "seed": run.seed,
                             "metric": metric, "value": evaluation[metric]})
    return pd.DataFrame(rows)


def test_mean_and_sd_over_seeds_match_numpy_on_the_eval_files(probe_study):
    study, outcome = probe_study
    values = _per_seed_values(study)
    spread = tables.seed_spread_table(tables.mean_over_seeds(tables.read_results(study / "results.csv")))
    assert len(spread) == 4  # 2 arms (fine-tune, linear probe) x 2 test domains, each with 2 seeds
    for row in spread.itertuples():
        for metric in tables.METRICS:
            per_seed = values[(values["model"] == row.model) & (values["test"] == row.test_domain)
                              & (values["metric"] == metric)]["value"].to_numpy()
            assert len(per_seed) == row.n_seeds == 2
            assert getattr(row, metric) == pytest.approx(np.mean(per_seed), abs=1e-12)
            assert getattr(row, f"{metric}_sd") == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)

    # the report shows them as "mean ± SD", 3 decimals, in its own section
    markdown = (study / "report.md").read_text(encoding="utf-8")
    assert "Mean ± SD over seeds" in markdown
    linear_400 = values[(values["model"] == f"{MODEL} [probe=linear]") & (values["test"] == "400")
                        & (values["metric"] == "macro_f1")]["value"].to_numpy()
    expected = f"{np.mean(linear_400):.3f} ± {np.std(linear_400, ddof=1):.3f}"
    line = next(line for line in markdown.splitlines()
                if line.startswith(f"| {MODEL} [probe=linear]") and re.search(r"\|\s*400\s*\|", line) and "±" in line)
    assert expected in line


def test_a_probe_run_missing_an_evaluation_is_completed_without_refitting_the_features(probe_study, learnable_root):
    study, _ = probe_study  # runs last: it rewrites one evaluation of the shared study
    run = next(path for path in (study / "runs").iterdir() if "probe-linear__seed1" in path.name)
    before = json.loads((run / "eval" / "400.json").read_text())
    features = Path(yaml.safe_load((run / "config.yaml").read_text())["features"]) / "features.h5"
    features_time = features.stat().st_mtime_ns
    (run / "eval" / "400.json").unlink()
    spec = spec_from_dict(spec_dict(learnable_root), "spec.yaml")
    planned = {r.run_id: r for r in expand(spec)}
    assert run_state(study, planned[run.name], spec) == "partial"
    run_grid(spec, study, build_report=False)
    after = json.loads((run / "eval" / "400.json").read_text())
    assert after["macro_f1"] == before["macro_f1"] and after["confusion_matrix"] == before["confusion_matrix"]
    assert features.stat().st_mtime_ns == features_time
