"""Callbacks that write the run folder: per-epoch metrics.csv, last.ckpt and the best weights (safetensors).

Writing a 134 MB last.ckpt (ResNet-18 with its optimiser state) after every epoch cost a quarter of
the training time on short epochs. :class:`LastCheckpoint` therefore writes it at most every
``interval_s`` seconds; between writes the state at the end of the last finished epoch is kept in
memory (copied into the same CPU buffers each epoch) and written when the run is interrupted or
fails, so SIGTERM, Ctrl-C, a requeue or an error lose no finished epoch, and a kill -9 loses at most
``interval_s`` plus the epoch in progress. :class:`BestWeightsSaver` keeps the best weights in memory
the same way and writes them before each last.ckpt, at the end of training and on an interruption.

Epochs are numbered from 1 within each stage, everywhere a person reads them: the console line,
metrics.csv's ``epoch`` column, best.json's ``epoch`` and status.json's ``best_epoch`` (see
:func:`epoch_number`). Lightning's ``trainer.current_epoch`` counts from 0.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import resource
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import Checkpoint, TQDMProgressBar

from histotoken.formats import BEST_META, BEST_WEIGHTS, VAL_ACC, VAL_MACRO_F1
from histotoken.io import atomic_write_json, atomic_write_text, read_json

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

    def __init__(self, path: Path, stage: int, after_row: Callable[[L.Trainer], None] | None = None) -> None:
        self.path, self.stage, self.after_row = path, stage, after_row
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
        if trainer.sanity_checking:
            return
        # The epoch's row and what resumes after it (``after_row``: LastCheckpoint) go together: a
        # SIGTERM arriving in between waits until both are done, then interrupts as usual.
        with signals_held():
            if trainer.is_global_zero:
                self._write_row(trainer)
            if self.after_row is not None:
                self.after_row(trainer)

    def _write_row(self, trainer: L.Trainer) -> None:
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


@contextlib.contextmanager
def signals_held(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)) -> Iterator[None]:
    """Within the block, SIGTERM, SIGINT and SIGUSR2 (SLURM's time-limit warning, on which a grid job
    requeues itself: experiments/launch.py) wait, and reach their own handlers when it ends.

    Held by Python handlers that only take note, not by the thread's signal mask: the kernel gives a
    signal sent to the process to any thread that does not block it (a claim's heartbeat, a loader
    thread), and Python then runs the main thread's handler at once, inside the block.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    held = {signum: signal.getsignal(signum) for signum in signals}
    held = {signum: handler for signum, handler in held.items() if handler is not None}  # None: not ours to swap
    for signum in held:
        signal.signal(signum, lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(arrived):
            signal.raise_signal(signum)


def keep(buffer: Any, value: Any) -> Any:
    """A CPU copy of ``value`` (a nested dict/list of tensors and plain values), reusing ``buffer``'s tensors.

    A tensor of ``buffer`` with the same shape and dtype is overwritten in place, so keeping the state
    of every epoch costs one memory copy and no new allocation.
    """
    if value is None or isinstance(value, (bool, int, float, str)):  # immutable: nothing to copy
        return value
    if isinstance(value, torch.Tensor):
        if isinstance(buffer, torch.Tensor) and buffer.shape == value.shape and buffer.dtype == value.dtype:
            return buffer.copy_(value.detach())
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        old = buffer if isinstance(buffer, dict) else {}
        kept = {key: keep(old.get(key), item) for key, item in value.items()}
        return OrderedDict(kept) if isinstance(value, OrderedDict) else kept
    if isinstance(value, (list, tuple)):
        old = buffer if isinstance(buffer, (list, tuple)) and len(buffer) == len(value) else [None] * len(value)
        items = [keep(b, item) for b, item in zip(old, value)]
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return copy.deepcopy(value)


class BestWeightsSaver(L.Callback):
    """Keeps the best weights by validation macro-F1 (ties broken by validation accuracy).

    Writes ``best.safetensors`` (weights only: safe to share and load) and ``best.json`` (what
    model and classes they belong to) whenever :meth:`flush` is called: by :class:`LastCheckpoint`
    before it writes last.ckpt, at the end of training and when training stops on an exception, so
    the files on disk always belong with the last.ckpt beside them. Its state travels in last.ckpt,
    so a resumed run keeps the best score it had.
    """

    def __init__(self, directory: Path, metadata: dict[str, Any], stage: int) -> None:
        self.directory, self.metadata, self.stage = directory, metadata, stage
        self.best_score: tuple[float, float] = (-math.inf, -math.inf)
        self.best_epoch = -1
        self._pending: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None  # best weights and best.json, unwritten
        self._spare: dict[str, torch.Tensor] | None = None  # buffers to copy the next best weights into

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
            weights = keep(self._spare, pl_module.model.state_dict())
            meta = {**self.metadata, "stage": self.stage, "epoch": self.best_epoch, VAL_MACRO_F1: score[0], VAL_ACC: score[1]}
            # replaced in one step, so an interruption during the copy leaves the previous best whole
            self._spare, self._pending = (self._pending[0] if self._pending else None), (weights, meta)

    def flush(self, trainer: L.Trainer) -> None:
        """Write the best weights and best.json if they changed since the last write."""
        if self._pending is None or not trainer.is_global_zero:
            return
        weights, meta = self._pending
        save_state(weights, self.directory / BEST_WEIGHTS)
        atomic_write_json(self.directory / BEST_META, meta)
        self._pending, self._spare = None, weights

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.flush(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": list(self.best_score), "best_epoch": self.best_epoch, "stage": self.stage}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("stage") == self.stage:
            self.best_score = tuple(state_dict["best_score"])
            self.best_epoch = state_dict["best_epoch"]
        # best weights written after the checkpoint resumed from (a kill between the two writes) stay the best
        meta_path = self.directory / BEST_META
        if meta_path.is_file() and (self.directory / BEST_WEIGHTS).is_file():
            meta = read_json(meta_path)
            on_disk = (meta.get(VAL_MACRO_F1, -math.inf), meta.get(VAL_ACC, -math.inf))
            if meta.get("stage") == self.stage and on_disk > self.best_score:
                self.best_score, self.best_epoch = on_disk, int(meta["epoch"])


class LastCheckpoint(L.Callback):
    """Writes last.ckpt (model, optimiser, schedule, loop and callback state) to resume from.

    At the end of an epoch (:meth:`epoch_end`, called by :class:`EpochMetricsWriter` right after the
    epoch's row) it writes when ``interval_s`` seconds have passed since the last write (0: after
    every epoch); otherwise it keeps the checkpoint in memory. When training stops on an exception
    (SIGTERM and SIGINT arrive as one, see engine/interrupt.py) the kept checkpoint of the last
    finished epoch is written, so resuming loses no finished epoch. The best weights are flushed
    first, so that best.safetensors never lags behind the best score last.ckpt records.
    """

    def __init__(self, path: Path, interval_s: float, best: BestWeightsSaver | None = None) -> None:
        self.path, self.interval_s, self.best = path, float(interval_s), best
        self._last_write = time.monotonic()
        self._kept: dict[str, Any] | None = None  # the last finished epoch's checkpoint, in reused buffers
        self._unwritten = False  # whether _kept is whole and newer than last.ckpt

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_write = time.monotonic()

    def epoch_end(self, trainer: L.Trainer) -> None:
        due = time.monotonic() - self._last_write >= self.interval_s
        # every process must take the same branch (trainer.save_checkpoint waits for all): the first decides
        if trainer.world_size > 1:
            due = trainer.strategy.broadcast(due, src=0)
        if due:
            if self.best is not None:
                self.best.flush(trainer)
            trainer.save_checkpoint(self.path)
            self._last_write, self._unwritten = time.monotonic(), False
        else:
            # What trainer.save_checkpoint would write now (Lightning has no public call for the dict),
            # copied over the previous epoch's in the same buffers: one copy of the state in memory, and
            # no new pages to fault in after the first epoch. Signals wait during the copy (this runs
            # under EpochMetricsWriter's signals_held), and a copy cut short by an error is never written.
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            self._unwritten = False
            self._kept = keep(self._kept, checkpoint)
            self._unwritten = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.best is not None:
            self.best.flush(trainer)
        if self._unwritten:
            trainer.strategy.save_checkpoint(self._kept, self.path)  # the first process writes; no barrier
            self._unwritten = False


def save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a state dict as safetensors, atomically."""
    from safetensors.torch import save

    from histotoken.io import atomic_write_bytes

    atomic_write_bytes(path, save({name: tensor.contiguous() for name, tensor in state.items()}))


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Write a model's weights as safetensors, atomically."""
    save_state({name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}, path)
