"""Multi-process training on CPU (DDP over gloo), the optimiser recipe, experiment loggers, short errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import timm
import torch

from histotoken.config import RunConfig
from histotoken.engine.evaluate import evaluate_run, load_best_model
from histotoken.engine.fit import train
from histotoken.engine.module import make_optimizer
from tests import run_config


def test_ddp_on_two_cpu_processes_writes_each_epoch_once_and_evaluates_like_one_process(synthetic_root, tmp_path):
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "histotoken.cli.main", "train", "--data", str(synthetic_root), "--model", "resnet18",
        "--task", "subtype", "--train-domain", "100", "--img-size", "32", "--epochs", "2", "--batch-size", "8",
        "--precision", "32-true", "--devices", "2", "--accelerator", "cpu", "--strategy", "ddp", "--out", str(run),
        "bootstrap=20",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1  # only the first process reports
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2]  # epochs count from 1
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    distributed = json.loads((run / "eval" / "100.json").read_text())
    split = pd.read_csv(run / "splits.csv", dtype={"patient_id": str, "magnification": str})
    readable = ((split["split"] == "test") & (split["magnification"].astype(str) == "100")).sum()
    assert distributed["n_images"] == readable
    single = evaluate_run(run, "100", n_bootstrap=20, accelerator="cpu", devices=1)
    assert single["confusion_matrix"] == distributed["confusion_matrix"]
    assert single["macro_f1"] == pytest.approx(distributed["macro_f1"])


def group_of(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, dict]:
    """Parameter name -> its optimiser group."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: group for group in optimizer.param_groups for p in group["params"]}


def test_no_weight_decay_on_norms_biases_position_embeddings_and_class_token():
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    groups = group_of(make_optimizer(model, lr=1e-3, weight_decay=0.05), model)
    for name in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "norm.bias", "head.bias"):
        assert groups[name]["weight_decay"] == 0.0, name
    for name in ("blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "head.weight", "patch_embed.proj.weight"):
        assert groups[name]["weight_decay"] == 0.05, name


@pytest.mark.parametrize("name", ["tokenlearner_vit_tiny", "cnnprune_vit_tiny", "tokenmixer_tiny"])
def test_what_a_family_lists_in_no_weight_decay_gets_none(name):
    model = timm.create_model(name, num_classes=2)
    listed = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups = group_of(make_optimizer(model, lr=1e-3, weight_decay=0.05), model)
    decayed = {n for n, g in groups.items() if g["weight_decay"] > 0}
    assert decayed, "some weights must decay"
    assert not {n for n in decayed if n in listed or groups[n] is None}
    assert all(model.get_parameter(n).ndim > 1 for n in decayed)


def test_frozen_parameters_are_left_out_of_the_optimiser():
    model = timm.create_model("resnet18", num_classes=2)
    for parameter in model.layer1.parameters():
        parameter.requires_grad_(False)
    groups = group_of(make_optimizer(model, lr=1e-3, weight_decay=0.05), model)
    assert not any(name.startswith("layer1.") for name in groups)
    assert "fc.weight" in groups


def test_layer_decay_gives_deeper_blocks_larger_learning_rates():
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    groups = group_of(make_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.65), model)
    scales = [groups[f"blocks.{i}.attn.qkv.weight"]["lr_scale"] for i in range(12)]
    assert scales == sorted(scales) and scales[0] < scales[-1] < 1.0
    assert groups["head.weight"]["lr_scale"] == pytest.approx(1.0)
    assert groups["blocks.11.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.65)


def test_layer_decay_on_a_model_without_layer_groups_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="group_matcher"):
        make_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.65)


def tiny_config(root, **changes) -> RunConfig:
    return run_config.tiny_config(root, **{**dict(bootstrap=0), **changes})


@pytest.mark.parametrize("name, expected", [
    ("csv", "logs/csv_stage1/metrics.csv"),
    ("tensorboard", "logs/tensorboard_stage1/events.out.tfevents.*"),
    ("mlflow", "mlruns/*/*/metrics/val/macro_f1"),
])
def test_experiment_loggers_log_and_metrics_csv_stays(synthetic_root, tmp_path, name, expected):
    run = tmp_path / "run"
    train(tiny_config(synthetic_root, logger=name), run)
    assert list(run.glob(expected)), f"{name} wrote nothing at {expected}: {sorted(str(p) for p in run.rglob('*'))[:20]}"
    assert list(pd.read_csv(run / "metrics.csv")["epoch"]) == [1]


def test_weights_of_another_model_give_a_short_error(synthetic_root, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(synthetic_root), run)
    meta_path = run / "checkpoints" / "best.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "model_name": "vit_tiny_patch16_224", "model_kwargs": {"patch_size": 8}}))
    with pytest.raises(ValueError) as error:
        load_best_model(run)
    message = str(error.value)
    assert "best.safetensors" in message and "vit_tiny_patch16_224" in message
    assert "missing" in message and "unexpected" in message and "more)" in message
    assert len(message) < 1200  # counts and a few examples, not hundreds of key names
