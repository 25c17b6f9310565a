"""Callbacks that write the run folder: per-epoch metrics.csv and the best weights (safetensors).

Epochs are numbered from 1 within each stage, everywhere a person reads them: the console line,
metrics.csv's ``epoch`` column, best.json's ``epoch`` and status.json's ``best_epoch`` (see
:func:`epoch_number`). Lightning's ``trainer.current_epoch`` counts from 0.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import Checkpoint, TQDMProgressBar

from histotoken.formats import BEST_META, BEST_WEIGHTS, VAL_ACC, VAL_MACRO_F1
from histotoken.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)


def peak_memory_mb() -> float:
    """Peak GPU memory allocated (CUDA) or the process's peak resident memory (CPU), in MB."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _scalar(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def epoch_number(trainer: L.Trainer) -> int:
    """The epoch being run, counted from 1 (Lightning's ``current_epoch`` counts from 0)."""
    return trainer.current_epoch + 1


class EpochProgressBar(TQDMProgressBar):
    """Lightning's progress bar, with epochs counted from 1 ("Epoch 1/3") like every other epoch number here."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        # as Lightning's own hook, with our description (its hook would first print "Epoch 0")
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        total = self.total_train_batches
        self.train_progress_bar.reset(total=None if total == float("inf") else total)
        self.train_progress_bar.initial = 0
        self.train_progress_bar.set_description(f"Epoch {epoch_number(trainer)}/{trainer.max_epochs}")


class EpochMetricsWriter(Checkpoint):
    """Appends one row per epoch to metrics.csv (rewritten atomically, so it is never half written).

    It is a ``Checkpoint`` callback so that Lightning calls its epoch-end hook after the module
    has computed the epoch's training metrics (as it does for ModelCheckpoint).
    """

    def __init__(self, path: Path, stage: int) -> None:
        self.path, self.stage = path, stage
        self._epoch_start = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs after a checkpoint was restored: a resumed stage drops rows of epochs it runs again
        # (epochs 1..current_epoch are done; the next to run is current_epoch + 1).
        if trainer.is_global_zero and self.path.is_file():
            frame = pd.read_csv(self.path)
            keep = (frame["stage"] < self.stage) | (
                (frame["stage"] == self.stage) & (frame["epoch"] <= trainer.current_epoch)
            )
            atomic_write_text(self.path, frame[keep].to_csv(index=False))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {name: _scalar(value) for name, value in trainer.callback_metrics.items()}
        first = [f"{side}/{name}" for side in ("train", "val") for name in ("loss", "acc", "macro_f1")]
        ordered = [k for k in first if k in metrics] + [
            k for k in metrics if k.startswith(("train/", "val/")) and k not in first
        ]
        row = {
            "stage": self.stage,
            "epoch": epoch_number(trainer),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            **{k: metrics[k] for k in ordered},
            "epoch_time_s": round(time.perf_counter() - self._epoch_start, 3),
            "peak_memory_mb": round(peak_memory_mb(), 1),
        }
        logger.info(
            "stage %d epoch %d/%d: train loss %.3f, val loss %.3f, val acc %.3f, val macro-F1 %.3f (%.1f s)",
            self.stage, row["epoch"], trainer.max_epochs, row.get("train/loss", float("nan")),
            row.get("val/loss", float("nan")), row.get("val/acc", float("nan")),
            row.get("val/macro_f1", float("nan")), row["epoch_time_s"],
        )
        frame = pd.read_csv(self.path) if self.path.is_file() else pd.DataFrame()
        frame = pd.concat([frame, pd.DataFrame([row])], ignore_index=True)
        atomic_write_text(self.path, frame.to_csv(index=False))


class BestWeightsSaver(L.Callback):
    """Keeps the best weights by validation macro-F1 (ties broken by validation accuracy).

    Writes ``best.safetensors`` (weights only: safe to share and load) and ``best.json`` (what
    model and classes they belong to). Its state travels in last.ckpt, so a resumed run keeps the
    best score it had.
    """

    def __init__(self, directory: Path, metadata: dict[str, Any], stage: int) -> None:
        self.directory, self.metadata, self.stage = directory, metadata, stage
        self.best_score: tuple[float, float] = (-math.inf, -math.inf)
        self.best_epoch = -1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs after the module's on_validation_epoch_end has logged the epoch's metrics.
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        score = (_scalar(metrics[VAL_MACRO_F1]), _scalar(metrics[VAL_ACC]))
        if score > self.best_score:
            self.best_score, self.best_epoch = score, epoch_number(trainer)
            if not trainer.is_global_zero:  # every process tracks the score; only the first writes
                return
            save_weights(pl_module.model, self.directory / BEST_WEIGHTS)
            atomic_write_json(
                self.directory / BEST_META,
                {
                    **self.metadata,
                    "stage": self.stage,
                    "epoch": epoch_number(trainer),
                    VAL_MACRO_F1: score[0],
                    VAL_ACC: score[1],
                },
            )

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": list(self.best_score), "best_epoch": self.best_epoch, "stage": self.stage}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("stage") == self.stage:
            self.best_score = tuple(state_dict["best_score"])
            self.best_epoch = state_dict["best_epoch"]


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Write a model's weights as safetensors, atomically."""
    from safetensors.torch import save

    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    from histotoken.io import atomic_write_bytes

    atomic_write_bytes(path, save(state))
