"""`histotoken slides train|evaluate` end to end on 12 tiny fake slides written with h5py."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest

from histotoken.cli.main import main

FEATURE_DIM = 8


def write_cohort(root, n_patients: int = 6, nodes: int = 2):
    """CAMELYON17-named slides (patient_XXX_node_Y), tumour slides with a planted signal in a few tiles."""
    features = root / "features"
    features.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for patient in range(n_patients):
        for node in range(nodes):
            slide = f"patient_{patient:03d}_node_{node}"
            label = (patient + node) % 2
            n_tiles = int(rng.integers(20, 40))
            tiles = rng.normal(size=(n_tiles, FEATURE_DIM)).astype(np.float32)
            if label:
                tiles[:5, 0] += 4.0
            coords = np.stack([rng.integers(0, 50, n_tiles) * 256, rng.integers(0, 50, n_tiles) * 256], 1)
            with h5py.File(features / f"{slide}.h5", "w") as handle:
                handle.create_dataset("features", data=tiles)
                handle.create_dataset("coords", data=coords.astype(np.int64))
                handle.attrs["slide"] = slide
                handle.attrs["backbone"] = "fake"
            rows.append((slide, "macro" if label else "negative"))
    labels = root / "slides.csv"
    labels.write_text("slide,label\n" + "".join(f"{slide}.tif,{label}\n" for slide, label in rows))
    return features, labels


def test_slides_train_then_evaluate_writes_the_run_folder(tmp_path, capsys):
    features, labels = write_cohort(tmp_path)
    run = tmp_path / "run"
    code = main(["slides", "train", "--features", str(features), "--labels", str(labels), "--aggregator", "abmil",
                 "--param", "dim=16", "--param", "attention_dim=8", "--epochs", "10", "--lr", "0.01",
                 "--bootstrap", "50", "--out", str(run)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "abmil: AUROC" in printed and "tokens in" in printed
    for name in ("config.json", "split.csv", "model.safetensors", "metrics.json", "eval.json", "predictions.csv"):
        assert (run / name).exists(), name

    split = pd.read_csv(run / "split.csv")
    assert len(split) == 12
    sides = split.groupby("patient_id")["split"].nunique()
    assert (sides == 1).all() and len(sides) == 6  # patient_XXX_node_Y grouped by patient_XXX, never on both sides
    test_slides = list(split.loc[split["split"] == "test", "slide"])
    assert test_slides

    result = json.loads((run / "eval.json").read_text())
    assert result["n_slides"] == len(test_slides) and result["interval_unit"] == "patients"
    for name in ("balanced_accuracy", "macro_f1"):
        low, high = result[f"{name}_ci95"]
        assert low <= result[name] <= high
    assert result["cost"]["tokens_in_mean"] == result["cost"]["tokens_kept_mean"]  # ABMIL keeps every tile

    predictions = pd.read_csv(run / "predictions.csv")
    assert list(predictions["slide"]) == test_slides
    assert {"tokens_in", "tokens_kept", "ms", "peak_memory_mb", "prob_tumor"} <= set(predictions.columns)
    slide = test_slides[0]
    importance = pd.read_csv(run / "importance" / f"{slide}.csv")
    with h5py.File(features / f"{slide}.h5", "r") as handle:
        coords = handle["coords"][...]
    np.testing.assert_array_equal(importance[["x", "y"]].to_numpy(), coords)  # one row per tile, in file order
    assert importance["importance"].sum() == pytest.approx(1.0, abs=1e-5)  # attention weights
    assert int(predictions.loc[0, "tokens_in"]) == len(coords)

    assert main(["slides", "evaluate", str(run)]) == 0
    again = json.loads((run / "eval.json").read_text())
    assert again["auroc"] == result["auroc"] and again["macro_f1"] == result["macro_f1"]


def test_slides_train_topk_reports_tokens_kept(tmp_path):
    features, labels = write_cohort(tmp_path)
    run = tmp_path / "topk"
    assert main(["slides", "train", "--features", str(features), "--labels", str(labels), "--aggregator", "topk",
                 "--param", "k=5", "--param", "dim=16", "--param", "num_heads=2", "--epochs", "2",
                 "--bootstrap", "0", "--out", str(run)]) == 0
    predictions = pd.read_csv(run / "predictions.csv")
    assert (predictions["tokens_kept"] == 5).all() and (predictions["tokens_in"] >= 20).all()


def test_missing_feature_file_is_one_line_naming_the_slide(tmp_path, capsys):
    features, labels = write_cohort(tmp_path)
    (features / "patient_000_node_1.h5").unlink()
    code = main(["slides", "train", "--features", str(features), "--labels", str(labels), "--aggregator", "mean",
                 "--out", str(tmp_path / "run")])
    assert code == 2
    assert "patient_000_node_1.h5" in capsys.readouterr().err


def test_command_choices_match_the_aggregator_registry():
    from histotoken.cli.slides import AGGREGATOR_NAMES
    from histotoken.mil.aggregators import AGGREGATORS

    assert set(AGGREGATOR_NAMES) == set(AGGREGATORS)
