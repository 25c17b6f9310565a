"""Probes on frozen features: the same predictions as scikit-learn fitted here on the same features and split,
a run folder like fine-tuning's (eval JSON keys), features computed once and reused."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import histotoken.models  # noqa: F401  (registers vit_mini_patch4_32)
from histotoken.cli.main import main
from histotoken.engine.fit import train
from histotoken.features.probe import ProbeSettings, evaluate_probe, train_probe
from tests.run_config import tiny_config

MODEL = "vit_mini_patch4_32"
CLASSES = ["benign", "malignant"]


def probe_config(root, **changes):
    return tiny_config(root, model=MODEL, task="binary", train_domain="100", **changes)


def features_and_split(run, features_dir, test_magnification=100):
    """The cached features (read with h5py) and the run's frozen split (train at 100X), independently of the library."""
    with h5py.File(features_dir / "features.h5", "r") as handle:
        keys = [v.decode() for v in handle["keys"][()]]
        matrix = handle["features"][()]
    row = {key: i for i, key in enumerate(keys)}
    split = pd.read_csv(run / "splits.csv")
    sides = {}
    for side, magnification in (("train", 100), ("test", test_magnification)):
        part = split[(split["split"] == side) & (split["magnification"] == magnification)]
        sides[side] = (matrix[[row[p] for p in part["path"]]], part["label"].map(CLASSES.index).to_numpy(), part)
    return sides


@pytest.fixture(scope="module")
def linear_run(learnable_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("probe") / "linear"
    result = train_probe(probe_config(learnable_root), run, ProbeSettings("linear", C=0.5, max_iter=300))
    return run, result


def test_linear_probe_predicts_as_scikit_learns_logistic_regression_on_the_same_features_and_split(linear_run):
    run, result = linear_run
    sides = features_and_split(run, result.features)
    x_train, y_train, _ = sides["train"]
    x_test, y_test, test = sides["test"]
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=300)).fit(x_train, y_train)
    expected = reference.predict(x_test)
    predictions = pd.read_csv(run / "eval" / "100.predictions.csv")
    assert predictions["path"].tolist() == test["path"].tolist()
    np.testing.assert_array_equal(predictions["prediction"].to_numpy(), expected)
    np.testing.assert_allclose(predictions["prob/malignant"], reference.predict_proba(x_test)[:, 1], atol=1e-6)
    evaluation = json.loads((run / "eval" / "100.json").read_text())
    assert evaluation["accuracy"] == pytest.approx(accuracy_score(y_test, expected))
    assert evaluation["macro_f1"] == pytest.approx(f1_score(y_test, expected, average="macro"))
    assert evaluation["probe"]["kind"] == "linear" and evaluation["n_images"] == len(y_test)


@pytest.mark.parametrize("kind", ["knn", "mlp"])
def test_knn_and_mlp_probes_predict_as_scikit_learn_does(learnable_root, linear_run, tmp_path, kind):
    _, linear = linear_run
    run = tmp_path / kind
    train_probe(probe_config(learnable_root), run, ProbeSettings(kind, k=5, hidden=16, max_iter=200), linear.features)
    sides = features_and_split(run, linear.features)
    x_train, y_train, _ = sides["train"]
    classifier = (KNeighborsClassifier(n_neighbors=5) if kind == "knn"
                  else MLPClassifier(hidden_layer_sizes=(16,), max_iter=200, random_state=0))
    expected = make_pipeline(StandardScaler(), classifier).fit(x_train, y_train).predict(sides["test"][0])
    predictions = pd.read_csv(run / "eval" / "100.predictions.csv")
    np.testing.assert_array_equal(predictions["prediction"].to_numpy(), expected)


def test_probe_run_folder_has_a_fine_tuned_runs_files_and_eval_keys(learnable_root, linear_run, tmp_path):
    run, _ = linear_run
    fine_tuned = tmp_path / "fine_tuned"
    train(probe_config(learnable_root), fine_tuned)
    for name in ("config.yaml", "environment.json", "splits.csv", "metrics.csv", "status.json", "eval/100.json",
                 "eval/100.predictions.csv"):
        assert (run / name).is_file(), name
    probe_keys = set(json.loads((run / "eval" / "100.json").read_text()))
    tuned_keys = set(json.loads((fine_tuned / "eval" / "100.json").read_text()))
    assert tuned_keys <= probe_keys and probe_keys - tuned_keys == {"probe"}
    # the same frozen patient-disjoint split as fine-tuning with the same seed
    pd.testing.assert_frame_equal(pd.read_csv(run / "splits.csv"), pd.read_csv(fine_tuned / "splits.csv"))
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


def test_train_probe_command_reuses_cached_features_and_leaves_a_finished_run(learnable_root, tmp_path, capsys):
    args = ["train", "--probe", "linear", "--model", MODEL, "--data", str(learnable_root), "--task", "binary",
            "--train-domain", "100", "bootstrap=50"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "linear probe" in printed and "macro-F1" in printed
    features = Path(yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["features"]) / "features.h5"
    assert features.is_file()
    before = features.stat().st_mtime_ns
    assert main([*args, "--out", str(tmp_path / "b")]) == 0  # a second probe: the same features, not recomputed
    assert features.stat().st_mtime_ns == before
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "already finished" in capsys.readouterr().out



def test_a_probe_run_evaluated_on_another_magnification_refits_the_same_probe(linear_run):
    run, result = linear_run
    evaluation = evaluate_probe(run, "400", n_bootstrap=0)
    sides = features_and_split(run, result.features, test_magnification=400)
    x_train, y_train, _ = sides["train"]
    x_test, y_test, test = sides["test"]
    expected = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=300)).fit(x_train, y_train).predict(x_test)
    predictions = pd.read_csv(run / "eval" / "400.predictions.csv")
    assert predictions["path"].tolist() == test["path"].tolist()
    np.testing.assert_array_equal(predictions["prediction"].to_numpy(), expected)
    assert evaluation["domain"] == "400" and evaluation["train_domain"] == "100"
    assert evaluation["accuracy"] == pytest.approx(accuracy_score(y_test, expected))
    assert json.loads((run / "eval" / "400.json").read_text())["n_images"] == len(y_test)


def test_evaluate_command_on_a_probe_run_refits_the_probe_instead_of_loading_weights(linear_run, capsys):
    run, _ = linear_run
    assert main(["evaluate", str(run), "--domain", "400", "--bootstrap", "0"]) == 0
    printed = capsys.readouterr().out
    assert "400: macro-F1" in printed
    recorded = json.loads((run / "eval" / "400.json").read_text())
    assert recorded["probe"]["kind"] == "linear" and recorded["checkpoint"] is None
    assert main(["evaluate", str(run), "--domain", "400", "--merge-r", "2"]) == 2
    assert "linear-probe run" in capsys.readouterr().err
