"""Interruptions are never silent: SIGTERM, kill -9 and torn checkpoints all resume without losing an epoch twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pandas as pd
import pytest

from histotoken.config import RunConfig
from histotoken.engine.fit import train
from tests import run_config


def tiny_config(root, **changes) -> RunConfig:
    return run_config.tiny_config(root, **{**dict(epochs=3, bootstrap=0), **changes})


def histotoken_command(data: Path, out: Path, epochs: int) -> list[str]:
    return [
        sys.executable, "-m", "histotoken.cli.main", "train", "--data", str(data), "--model", "resnet18",
        "--task", "subtype", "--train-domain", "100", "--img-size", "32", "--epochs", str(epochs),
        "--batch-size", "8", "--precision", "32-true", "--accelerator", "cpu", "--out", str(out),
        "early_stopping_patience=100", "bootstrap=0",
    ]


def epochs_written(run: Path) -> int:
    metrics = run / "metrics.csv"
    return len(pd.read_csv(metrics)) if metrics.is_file() else 0


def start_and_signal(command: list[str], run: Path, after_epochs: int, signum: int) -> subprocess.CompletedProcess:
    """Start a training command, send ``signum`` once metrics.csv has ``after_epochs`` rows, wait for it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while epochs_written(run) < after_epochs and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, f"training ended before it could be interrupted:\n{process.stderr.read()}"
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_sigterm_then_kill_9_then_rerun_resumes_and_records_every_epoch_once(synthetic_root, tmp_path):
    run = tmp_path / "run"
    command = histotoken_command(synthetic_root, run, epochs=6)

    terminated = start_and_signal(command, run, after_epochs=1, signum=signal.SIGTERM)
    assert terminated.returncode == 143, terminated.stderr
    assert "interrupted" in terminated.stderr and "Re-run the same command to resume" in terminated.stderr
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted", status
    assert (run / "checkpoints" / "last.ckpt").is_file()

    done_before_kill = epochs_written(run)
    killed = start_and_signal(command, run, after_epochs=done_before_kill + 2, signum=signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((run / "status.json").read_text())["state"] == "running"  # nobody could record the kill
    from histotoken.engine.run_lock import writer_alive

    assert not writer_alive(run)  # the kernel dropped the dead writer's lock

    finished = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert finished.returncode == 0, finished.stderr
    assert "previous attempt stopped without recording why" in finished.stderr
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["epoch"]) == list(range(1, 7))  # every epoch exactly once, in order
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


class CrashAt(L.Callback):
    """Raises at the first batch of ``epoch`` in ``stage`` (as a killed job would stop)."""

    def __init__(self, stage: int, epoch: int) -> None:
        self.stage, self.epoch = stage, epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.stage == self.stage and trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def test_a_torn_last_checkpoint_is_reported_and_the_stage_restarts(synthetic_root, tmp_path, caplog):
    run = tmp_path / "run"
    config = tiny_config(synthetic_root, epochs=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, run, extra_callbacks=[CrashAt(1, 2)])
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a kill in the middle of the write
    with caplog.at_level("WARNING"):
        result = train(config, run)
    assert "last.ckpt is incomplete" in caplog.text and "restarting stage 1" in caplog.text
    assert (run / "checkpoints" / "last.ckpt.torn").is_file()
    assert list(pd.read_csv(run / "metrics.csv")["epoch"]) == [1, 2, 3]
    assert not result.already_finished


def test_two_stage_model_resumes_in_the_middle_of_stage_two(learnable_root, tmp_path):
    run = tmp_path / "run"
    config = tiny_config(
        learnable_root, model="cnnprune_vit_tiny:patch_size=8,keep_ratio=0.5", stage_epochs=(2, 3),
        early_stopping_patience=10,
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, run, extra_callbacks=[CrashAt(2, 2)])
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and status["stages_done"] == [1]
    stage1_weights = (run / "checkpoints" / "stage1_final.safetensors").read_bytes()
    train(config, run)
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(zip(metrics["stage"], metrics["epoch"])) == [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3)]
    assert (run / "checkpoints" / "stage1_final.safetensors").read_bytes() == stage1_weights  # stage 1 not redone
    assert json.loads((run / "status.json").read_text())["stages_done"] == [1, 2]


def test_atomic_writes_never_change_the_process_umask(tmp_path, monkeypatch):
    # os.umask(0) for a moment would let another thread's files be created world-writable.
    from histotoken.io import atomic_write_json

    reference = tmp_path / "reference.txt"
    reference.write_text("made by open(), with the process's umask")  # the mode any ordinary file gets

    def forbidden(mask):
        raise AssertionError("os.umask must not be called while threads may create files")

    monkeypatch.setattr(os, "umask", forbidden)
    written = atomic_write_json(tmp_path / "sub" / "result.json", {"a": 1})
    assert json.loads(written.read_text()) == {"a": 1}
    assert (written.stat().st_mode & 0o777) == (reference.stat().st_mode & 0o777)
    assert [path.name for path in written.parent.iterdir()] == ["result.json"]  # no temporary left behind


class WatchCheckpoint(L.Callback):
    """Counts the checkpoints the trainer saves (written in the background, so the file's presence would race);
    copies the weights at the end of ``keep_epoch`` (1-based); raises at the first batch of ``crash_epoch``."""

    def __init__(self, keep_epoch: int, crash_epoch: int | None) -> None:
        self.keep_epoch, self.crash_epoch = keep_epoch, crash_epoch
        self.saves = 0
        self.weights: dict | None = None

    def on_fit_start(self, trainer, pl_module):
        save = trainer.save_checkpoint

        def counted(*args, **kwargs):
            self.saves += 1
            return save(*args, **kwargs)

        trainer.save_checkpoint = counted

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.crash_epoch is not None and trainer.current_epoch + 1 == self.crash_epoch:
            raise RuntimeError("simulated crash")

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 == self.keep_epoch:
            self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


@pytest.mark.parametrize("interval_s, saves", [(0, 2), (3600, 0)])
def test_last_checkpoint_is_written_on_its_interval_and_the_kept_one_on_a_crash(
    synthetic_root, tmp_path, interval_s, saves
):
    run = tmp_path / "run"
    watch = WatchCheckpoint(keep_epoch=2, crash_epoch=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_config(synthetic_root, checkpoint_interval_s=interval_s), run, extra_callbacks=[watch])
    assert watch.saves == saves  # 0 s: after epochs 1 and 2; 3600 s: none while training went well
    # whatever the interval, the crash leaves the checkpoint of the last finished epoch (2), whole
    import torch

    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["epoch"] == 1  # Lightning counts from 0: epoch 2 finished
    saved = checkpoint["state_dict"]
    assert saved.keys() == watch.weights.keys()
    for name, value in watch.weights.items():
        assert torch.equal(saved[name], value), name
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["epoch"] in (1, 2) and (run / "checkpoints" / "best.safetensors").is_file()
    assert list(pd.read_csv(run / "metrics.csv")["epoch"]) == [1, 2]


class WatchKeptBuffers(L.Callback):
    """Records where the engine's in-memory checkpoint keeps each weight after every epoch."""

    def __init__(self) -> None:
        self.addresses: list[dict[str, int]] = []

    def on_train_epoch_end(self, trainer, pl_module):  # after the engine's own callbacks: this epoch's state
        self._read(trainer)

    def on_train_end(self, trainer, pl_module):
        self._read(trainer)

    def _read(self, trainer):
        from histotoken.engine.callbacks import LastCheckpoint

        (last,) = [c for c in trainer.callbacks if isinstance(c, LastCheckpoint)]
        if last._kept is not None:
            self.addresses.append({k: v.data_ptr() for k, v in last._kept["state_dict"].items()})


def test_the_kept_checkpoint_is_one_copy_overwritten_in_place_every_epoch(synthetic_root, tmp_path):
    watch = WatchKeptBuffers()
    train(tiny_config(synthetic_root, epochs=4, checkpoint_interval_s=3600), tmp_path / "run", extra_callbacks=[watch])
    assert len(watch.addresses) >= 4  # after each of the 4 epochs (and at the end)
    assert all(addresses == watch.addresses[0] for addresses in watch.addresses)


def test_a_kept_checkpoint_cut_short_by_an_error_is_never_written(synthetic_root, tmp_path, monkeypatch):
    from histotoken.engine import callbacks

    calls = {"n": 0}
    real_keep = callbacks.keep

    def failing_keep(buffer, value):
        if isinstance(value, dict) and "optimizer_states" in value:  # a whole checkpoint (keep also recurses)
            calls["n"] += 1
            if calls["n"] == 2:  # epoch 2's copy over epoch 1's buffers fails half-way
                real_keep(buffer["state_dict"], value["state_dict"])
                raise RuntimeError("copy failed")
        return real_keep(buffer, value)

    monkeypatch.setattr(callbacks, "keep", failing_keep)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="copy failed"):
        train(tiny_config(synthetic_root, checkpoint_interval_s=3600), run)
    # epoch 1's checkpoint was overwritten in part: writing it would resume from a mix of two epochs
    assert not (run / "checkpoints" / "last.ckpt").exists()
