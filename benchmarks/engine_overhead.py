"""Engine overhead: training throughput of `histotoken train` against a bare PyTorch loop, side by side.

For each (model, image size) both do the same work per epoch: the same model, the same decoded
images and transforms (train augmentation per image through a DataLoader), the same batch size,
precision, AdamW with gradient clipping, and a validation pass. The engine adds Lightning, its
metrics, metrics.csv, last.ckpt (written at most every ``checkpoint_interval_s``, default 60 s,
and kept in memory between writes) and the best weights (kept in memory, written with last.ckpt
and at the end). Each engine epoch is preceded by one bare-loop epoch in the same process (see
SideBySide) and timed from its start to the next epoch's start, every hook included, over
``--repeats`` fresh runs. The median epoch time over the measured epochs is reported; the ratio
bare / engine is the engine's efficiency per epoch (target: at least 0.95).

The first ``--warmup-epochs`` epochs of every run (engine or bare) are left out of that median and
reported on their own (``first_epochs_ratio``): they pay one-off costs, such as first touching the
memory of the model, the optimiser state and the engine's in-memory checkpoint, which a run pays
once and not per epoch.

It also prints evaluation throughput: the hand-written CPU loop the engine used before
(per-image transforms, no Lightning) against the current evaluation (``Trainer.predict`` with
normalisation as one batch operation on the device).

    python benchmarks/engine_overhead.py                         # resnet18 and deit_tiny at 64 and 224 px
    python benchmarks/engine_overhead.py --models resnet18 --sizes 64 --epochs 4 --repeats 1   # quick
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import pandas as pd
import torch

from histotoken.config import RunConfig
from histotoken.data.dataset import ImageDataset, ImageStore
from histotoken.data.splits import read_split
from histotoken.data.transforms import eval_transform, model_normalisation, train_transform
from histotoken.engine.benchmark import machine_description
from histotoken.engine.fit import train
from histotoken.engine.inference import predict_logits
from histotoken.engine.module import make_optimizer
from histotoken.engine.precision import autocast_context, resolve_precision
from histotoken.models.factory import create_model, parse_model_spec


def bare_epoch(model, train_loader, val_loader, optimizer, precision: str) -> float:
    """One epoch of plain PyTorch: train (autocast, backward, clip 1.0, step) then a validation pass."""
    start = time.perf_counter()
    model.train()
    criterion = torch.nn.CrossEntropyLoss()
    for images, targets in train_loader:
        with autocast_context(precision):
            loss = criterion(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    with torch.inference_mode(), autocast_context(precision):
        for images, _ in val_loader:
            model(images)
    return time.perf_counter() - start


class SideBySide(L.Callback):
    """Runs one bare-loop epoch right before each engine epoch, and times both.

    The bare loop has its own model, optimiser and loaders over the same split, decoded images and
    transforms as the engine run (read from the run's splits.csv). An engine epoch is timed from its
    start, after the bare epoch, to the start of the next (the last: to the end of training), so every
    hook of the engine (metrics.csv, last.ckpt, best weights, early stopping) counts in its epoch.
    Alternating epoch by epoch, a machine that speeds up or slows down during the measurement (as shared
    2-core machines do, by 5-10% within a minute) affects both alike.
    """

    def __init__(self, run_dir: Path, model_name: str, img_size: int, batch_size: int, precision: str) -> None:
        self.run_dir, self.model_name, self.img_size = run_dir, model_name, img_size
        self.batch_size, self.precision = batch_size, precision
        self.ends: list[float] = []  # when each engine epoch (and the training) ended
        self.starts: list[float] = []
        self.bare: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        split = read_split(self.run_dir / "splits.csv")
        self.model = create_model(parse_model_spec(self.model_name), 8, self.img_size)
        mean, std = model_normalisation(self.model)
        stores = {side: ImageStore.build(split[split["split"] == side], self.img_size, universe=split) for side in ("train", "val")}
        names = sorted(split["tumor_class"].unique())
        train_set = ImageDataset(stores["train"], names, "tumor_class", train_transform(self.img_size, mean, std))
        val_set = ImageDataset(stores["val"], names, "tumor_class", eval_transform(mean, std))
        self.loader = torch.utils.data.DataLoader(train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)
        self.val_loader = torch.utils.data.DataLoader(val_set, batch_size=self.batch_size)
        self.optimizer = make_optimizer(self.model, 3e-4, 0.05)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.ends.append(time.perf_counter())
        self.bare.append(bare_epoch(self.model, self.loader, self.val_loader, self.optimizer, self.precision))
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.ends.append(time.perf_counter())

    def engine(self) -> list[float]:
        return [end - start for start, end in zip(self.starts, self.ends[1:])]


def old_evaluation_loop(model, images: torch.Tensor, transform, batch_size: int, precision: str) -> None:
    """The evaluation loop the engine had before: per-image transforms, CPU autocast, no Lightning."""
    with torch.inference_mode(), autocast_context(precision):
        for start in range(0, len(images), batch_size):
            batch = torch.stack([transform(image) for image in images[start : start + batch_size]])
            model(batch).float().argmax(dim=1)


def measure(
    model_name: str, img_size: int, data: Path, epochs: int, batch_size: int, work: Path, repeats: int, warmup: int
) -> dict:
    precision = resolve_precision("auto", "cpu", img_size)
    base = RunConfig(
        data=str(data), model=model_name, task="subtype", train_domain="all", img_size=img_size, epochs=epochs,
        batch_size=batch_size, precision=precision, bootstrap=0, early_stopping_patience=epochs, warmup_epochs=0,
    )
    engine_times, bare_times, engine_first, bare_first = [], [], [], []
    for repeat in range(repeats):  # a fresh engine run and bare model each time
        run_dir = work / f"{model_name}-{img_size}-{repeat}"
        clock = SideBySide(run_dir, model_name, img_size, batch_size, precision)
        train(base, run_dir, progress_bar=False, extra_callbacks=[clock])
        engine, bare = clock.engine(), clock.bare
        engine_first, bare_first = engine_first + engine[:warmup], bare_first + bare[:warmup]
        engine_times, bare_times = engine_times + engine[warmup:], bare_times + bare[warmup:]
    split = read_split(run_dir / "splits.csv")
    model, names = clock.model, sorted(split["tumor_class"].unique())
    mean, std = model_normalisation(model)
    n_train = len(clock.loader.dataset)
    engine_median, bare_median = statistics.median(engine_times), statistics.median(bare_times)

    # Evaluation throughput: old per-image loop vs Trainer.predict, on the test images.
    test = split[split["split"] == "test"]
    store = ImageStore.build(test, img_size, universe=split)
    model.eval()
    old, new = [], []
    for _ in range(3):
        start = time.perf_counter()
        old_evaluation_loop(model, store.images, eval_transform(mean, std), 64, precision)
        old.append(time.perf_counter() - start)
        start = time.perf_counter()
        predict_logits(model, ImageDataset(store, names, "tumor_class", lambda x: x), mean=mean, std=std,
                       batch_size=64, accelerator="cpu", precision=precision)
        new.append(time.perf_counter() - start)
    n_test = len(store.images)
    return {
        "model": model_name, "img_size": img_size, "precision": precision, "train_images": n_train,
        "engine_img_s": round(n_train / engine_median, 1), "bare_img_s": round(n_train / bare_median, 1),
        "engine_epoch_s": round(engine_median, 3), "bare_epoch_s": round(bare_median, 3),
        "ratio_engine_vs_bare": round(bare_median / engine_median, 3),
        "first_epochs_ratio": round(statistics.mean(bare_first) / statistics.mean(engine_first), 3),
        "eval_before_img_s": round(n_test / statistics.median(old), 1),
        "eval_after_img_s": round(n_test / statistics.median(new), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "deit_tiny_patch16_224"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 224])
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run, warm-up included (default 6)")
    parser.add_argument("--warmup-epochs", type=int, default=2,
                        help="first epochs of each run reported apart from the per-epoch median (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh engine runs, each beside a fresh bare loop (default 3)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--patients-per-class", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("lightning", "histotoken")):
            logging.getLogger(name).setLevel(logging.ERROR)
    from histotoken.data.synthetic import generate_synthetic_breakhis

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        generate_synthetic_breakhis(data, patients_per_class=args.patients_per_class, images_per_patient=4,
                                    magnifications=(100, 400), size=(160, 104), seed=0)
        if not 0 < args.warmup_epochs < args.epochs:
            parser.error("--warmup-epochs must be at least 1 and fewer than --epochs")
        rows = [
            measure(m, s, data, args.epochs, args.batch_size, work, args.repeats, args.warmup_epochs)
            for m in args.models for s in args.sizes
        ]
    print(f"machine: {machine_description()}")
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
