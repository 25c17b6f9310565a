"""End-to-end training and evaluation on the tiny synthetic set."""

from __future__ import annotations

import json
import logging
import re

import lightning as L
import pandas as pd
import pytest
import yaml

from histotoken.engine.evaluate import evaluate_run
from histotoken.engine.fit import train
from tests.run_config import tiny_config

BASELINES = [
    "resnet18",
    "deit_small_patch16_224",
    "vit_small_patch16_224",
    "swin_tiny_patch4_window7_224",
    "mixer_s16_224",
    "convmixer_768_32",
]


@pytest.mark.parametrize("model", BASELINES)
def test_named_baselines_train_and_evaluate_at_tiny_size(synthetic_root, tmp_path, model):
    result = train(tiny_config(synthetic_root, model=model), tmp_path / "run")
    run = tmp_path / "run"
    for name in ("config.yaml", "environment.json", "splits.csv", "metrics.csv", "status.json",
                 "checkpoints/best.safetensors", "checkpoints/best.json", "eval/100.json"):
        assert (run / name).is_file(), name
    assert not (run / "checkpoints" / "last.ckpt").exists()  # only an unfinished run keeps one to resume from
    evaluation = json.loads((run / "eval" / "100.json").read_text())
    assert evaluation["n_images"] == result.evaluation["n_images"] > 0
    assert 0.0 <= evaluation["macro_f1"] <= 1.0
    assert len(evaluation["confusion_matrix"]) == 8
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


def test_run_folder_records_config_environment_and_frozen_split(synthetic_root, tmp_path, caplog, capfd):
    with caplog.at_level(logging.INFO, logger="histotoken.engine.callbacks"):
        train(tiny_config(synthetic_root, epochs=2), tmp_path / "run", progress_bar=True)
    bar = "".join(capfd.readouterr())  # Lightning's bar writes to stdout
    run = tmp_path / "run"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"] == "resnet18" and config["epochs"] == 2
    environment = json.loads((run / "environment.json").read_text())
    assert environment["seed"] == 0 and environment["packages"]["torch"]
    import platform

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert environment["malloc_tuning"] is glibc  # train() set glibc to keep freed memory (engine/allocator.py)
    metrics = pd.read_csv(run / "metrics.csv")
    # one epoch numbering (from 1) in the console line, metrics.csv, best.json and status.json
    console = [int(m.group(1)) for m in re.finditer(r"stage 1 epoch (\d+)/2:", caplog.text)]
    assert console == list(metrics["epoch"]) == [1, 2]
    assert "Epoch 1/2" in bar and "Epoch 2/2" in bar and "Epoch 0" not in bar  # the progress bar counts alike
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    ranked = metrics.sort_values(["val/macro_f1", "val/acc"], ascending=False, kind="stable")
    assert best["epoch"] == int(ranked["epoch"].iloc[0])  # the row whose scores best.json records
    assert best["val/macro_f1"] == pytest.approx(ranked["val/macro_f1"].iloc[0])
    assert json.loads((run / "status.json").read_text())["best_epoch"] == best["epoch"]
    for column in ("train/loss", "train/acc", "train/macro_f1", "val/loss", "val/acc", "val/macro_f1",
                   "val/f1/adenosis", "epoch_time_s", "peak_memory_mb"):
        assert metrics[column].notna().all(), column
    split = pd.read_csv(run / "splits.csv", dtype={"patient_id": str})
    assert split.groupby("patient_id")["split"].nunique().max() == 1


def test_cross_domain_evaluation_uses_the_same_test_patients(synthetic_root, tmp_path):
    train(tiny_config(synthetic_root), tmp_path / "run")
    in_domain = json.loads((tmp_path / "run" / "eval" / "100.json").read_text())
    cross = evaluate_run(tmp_path / "run", "400", n_bootstrap=50)
    assert cross["domain"] == "400" and cross["train_domain"] == "100"
    assert cross["n_patients"] == in_domain["n_patients"]
    assert (tmp_path / "run" / "eval" / "400.json").is_file()


def test_finished_run_is_not_repeated(synthetic_root, tmp_path):
    train(tiny_config(synthetic_root), tmp_path / "run")
    before = (tmp_path / "run" / "checkpoints" / "best.safetensors").stat().st_mtime_ns
    again = train(tiny_config(synthetic_root), tmp_path / "run")
    assert again.already_finished
    assert (tmp_path / "run" / "checkpoints" / "best.safetensors").stat().st_mtime_ns == before


def test_a_different_config_in_the_same_folder_is_refused(synthetic_root, tmp_path):
    train(tiny_config(synthetic_root), tmp_path / "run")
    with pytest.raises(ValueError, match="another configuration.*epochs"):
        train(tiny_config(synthetic_root, epochs=3), tmp_path / "run")


class StopAfterFirstEpoch(L.Callback):
    """Crashes at the first batch of the second epoch, as a killed job would."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


def test_interrupted_run_resumes_from_last_checkpoint(synthetic_root, tmp_path):
    config = tiny_config(synthetic_root, epochs=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, tmp_path / "run", extra_callbacks=[StopAfterFirstEpoch()])
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "simulated crash" in status["error"]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    first_rows = pd.read_csv(tmp_path / "run" / "metrics.csv")
    result = train(config, tmp_path / "run")
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2, 3]  # epoch 1 kept, training went on from epoch 2
    assert metrics.loc[0, "train/loss"] == pytest.approx(first_rows.loc[0, "train/loss"])
    assert not result.already_finished


def test_same_seed_same_numbers(synthetic_root, tmp_path):
    a = train(tiny_config(synthetic_root, epochs=2), tmp_path / "a")
    b = train(tiny_config(synthetic_root, epochs=2), tmp_path / "b")
    metrics_a = pd.read_csv(tmp_path / "a" / "metrics.csv").drop(columns=["epoch_time_s", "peak_memory_mb"])
    metrics_b = pd.read_csv(tmp_path / "b" / "metrics.csv").drop(columns=["epoch_time_s", "peak_memory_mb"])
    pd.testing.assert_frame_equal(metrics_a, metrics_b)
    assert a.evaluation["confusion_matrix"] == b.evaluation["confusion_matrix"]


def test_model_learns_the_synthetic_subtypes(learnable_root, tmp_path):
    result = train(
        tiny_config(learnable_root, epochs=8, img_size=48, lr=1e-3, batch_size=16), tmp_path / "run"
    )
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics["train/loss"].iloc[-1] < metrics["train/loss"].iloc[0]
    assert result.evaluation["accuracy"] > 0.3  # chance is 0.125 for 8 subtypes


FAMILIES = [
    ("tokenlearner_vit_tiny:patch_size=8,num_tokens=4", None),
    ("tokenmixer_tiny:patch_size=8", None),
    ("cnnprune_vit_tiny:patch_size=8,keep_ratio=0.5", (2, 3)),
    ("mixer_tiny:patch_size=8", None),
    ("convmixer_tiny", None),
]


@pytest.mark.parametrize("model, stages", FAMILIES)
def test_each_family_trains_on_the_synthetic_set_and_its_loss_falls(learnable_root, tmp_path, model, stages):
    config = tiny_config(
        learnable_root, model=model, img_size=32, epochs=4, lr=1e-3, stage_epochs=stages, early_stopping_patience=10
    )
    result = train(config, tmp_path / "run")
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    final = metrics[metrics["stage"] == metrics["stage"].max()]
    assert final["train/loss"].iloc[-1] < final["train/loss"].iloc[0]
    assert result.evaluation["n_images"] > 0
    if stages:  # the run folder records both stages, and stage 1's weights
        assert sorted(metrics["stage"].unique()) == [1, 2]
        assert list(metrics.groupby("stage").size()) == list(stages)
        assert (tmp_path / "run" / "checkpoints" / "stage1_final.safetensors").is_file()
        assert json.loads((tmp_path / "run" / "status.json").read_text())["stages_done"] == [1, 2]


def test_token_merging_at_test_time_writes_its_own_evaluation(synthetic_root, tmp_path):
    train(tiny_config(synthetic_root, model="vit_tiny_patch16_224:patch_size=8"), tmp_path / "run")
    plain = json.loads((tmp_path / "run" / "eval" / "100.json").read_text())
    merged = evaluate_run(tmp_path / "run", "100", n_bootstrap=0, merge_r=4)
    assert merged["merge_r"] == 4 and plain["merge_r"] == 0
    assert (tmp_path / "run" / "eval" / "100__merge_r4.json").is_file()
    # the run's own evaluation is left as it was
    assert json.loads((tmp_path / "run" / "eval" / "100.json").read_text()) == plain
    assert merged["n_images"] == plain["n_images"]


def test_validation_loss_and_accuracy_equal_a_recomputation_from_the_saved_weights(synthetic_root, tmp_path):
    """metrics.csv's val/loss is the mean cross-entropy per image over the whole val split (its batches
    of 6 are of unequal size), and val/acc scikit-learn's accuracy, both from the epoch's weights."""
    import torch
    from sklearn.metrics import accuracy_score

    from histotoken.data.dataset import ImageDataset, ImageStore
    from histotoken.data.domains import select_domain
    from histotoken.data.splits import read_split
    from histotoken.data.transforms import eval_transform, model_normalisation
    from histotoken.engine.evaluate import load_best_model

    run = tmp_path / "run"
    train(tiny_config(synthetic_root, epochs=1, batch_size=6, bootstrap=0), run)
    model, meta = load_best_model(run)  # one epoch: its best weights are the epoch's weights
    split = read_split(run / "splits.csv")
    val = select_domain(split[split["split"] == "val"], "100")
    assert len(val) % 6, "the test needs a last batch of another size"
    mean, std = model_normalisation(model)
    dataset = ImageDataset(ImageStore.build(val, 32, universe=split), meta["class_names"], meta["class_column"],
                           eval_transform(mean, std))
    images, targets = zip(*(dataset[i] for i in range(len(dataset))))
    with torch.no_grad():
        logits = model(torch.stack(images))
    targets = torch.as_tensor(targets)
    metrics = pd.read_csv(run / "metrics.csv").iloc[0]
    expected_loss = torch.nn.functional.cross_entropy(logits, targets).item()
    assert metrics["val/loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["val/acc"] == pytest.approx(accuracy_score(targets.numpy(), logits.argmax(1).numpy()))
