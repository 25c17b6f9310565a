"""Smoke runs of the benchmark scripts (--tiny), so that they cannot rot. Figures are printed, never asserted;
what is checked is that each script runs through the library's own functions and reports consistent counts."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_trains_evaluates_predicts_and_compares_on_the_cpu(tmp_path, capsys):
    figures = load("gpu_check").main(["--tiny", "--out", str(tmp_path)])
    split = pd.read_csv(tmp_path / "run" / "splits.csv")
    test_images = int((split["split"] == "test").sum())
    assert figures["synthetic"]["images"] == len(split) == 96
    assert figures["train"]["images"] == int((split["split"] == "train").sum())
    assert figures["evaluate"]["images"] == test_images == figures["predict"]["images"] == figures["predict"]["scored"]
    evaluation = json.loads((tmp_path / "run" / "eval" / "all.json").read_text())
    assert figures["evaluate"]["macro_f1"] == evaluation["macro_f1"]
    assert [row["model"] for row in figures["throughput"]] == [
        "deit_tiny_patch16_224", "tokenlearner_vit_tiny", "cnnprune_vit_tiny@keep_ratio=0.5",
        "deit_tiny_patch16_224@merge_r=2"]
    assert figures["throughput"][0]["throughput_ratio"] == 1.0
    assert figures["ddp"]["ran"] is False
    assert json.loads((tmp_path / "gpu_check.json").read_text())["model"] == "deit_tiny_patch16_224"
    assert "img/s" in capsys.readouterr().out


def test_gpu_check_draws_at_least_breakhis_s_image_count():
    assert load("gpu_check").synthetic_layout(7909, 10) == (10, 25)  # 8 x 4 x 10 x 25 = 8,000 >= 7,909


def test_embed_throughput_measures_each_backbone_and_its_merged_variant():
    rows = load("embed_throughput").main(["--tiny"])
    assert [row["variant"] for row in rows] == ["resnet18", "vit_small_patch16_224", "vit_small_patch16_224 merge_r=2"]
    assert [row["dim"] for row in rows] == [512, 384, 384]
    assert rows[0]["cosine"] is None and 0.5 < rows[2]["cosine"] <= 1.0 + 1e-6
    assert all(row["extract_tiles_s"] > 0 and row["model_tiles_s"] > 0 for row in rows)


def test_mil_scaling_growth_exponent_and_every_aggregator():
    module = load("mil_scaling")
    # hand-worked: time x100 when tiles x10 -> exponent 2; x10 -> 1
    assert module.growth_exponent([10, 100, 1000], [1.0, 100.0, 1000.0]) == pytest.approx([2.0, 1.0])
    assert math.isnan(module.growth_exponent([1, 2], [0.0, 1.0])[0])
    from histotoken.mil.aggregators import AGGREGATORS

    rows = module.main(["--tiny"])
    assert [row["aggregator"] for row in rows] == list(AGGREGATORS)
    by_name = {row["aggregator"]: row for row in rows}
    assert by_name["mean"]["kept"] == [64, 256]  # mean pooling reads every tile
    assert all(len(row["time_exponent"]) == 1 for row in rows)


def test_probe_vs_finetune_uses_one_split_and_reports_each_runs_balanced_accuracy(tmp_path):
    result = load("probe_vs_finetune").main(["--tiny", "--out", str(tmp_path)])
    assert result["same_split"] is True
    assert set(result["timings"]) == {"probe, embed included", "probe, embed excluded", "fine-tune"}
    predictions = pd.read_csv(tmp_path / "probe" / "eval" / "100.predictions.csv")
    expected = balanced_accuracy_score(predictions["target"], predictions["prediction"])
    assert result["balanced_accuracy"]["probe, embed included"] == pytest.approx(expected)
    assert result["balanced_accuracy"]["probe, embed excluded"] == pytest.approx(expected)  # same features, same probe
