"""``train()``: one run, from configuration to a complete run folder; resumable.

Run folder (see docs/formats.md): config.yaml, environment.json, splits.csv, status.json,
metrics.csv, checkpoints/{last.ckpt, best.safetensors, best.json}, eval/<train_domain>.json.
Re-running on the same folder resumes from last.ckpt; a finished run is left as it is.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from histotoken.config import RunConfig, write_run_config
from histotoken.data.domains import domain_name, select_domain
from histotoken.data.splits import make_split, read_split, write_split
from histotoken.engine.interrupt import RunInterrupted
from histotoken.engine.ranks import is_global_zero
from histotoken.formats import (
    STATE_FAILED,
    STATE_FINISHED,
    STATE_INTERRUPTED,
    STATE_NEW,
    STATE_RUNNING,
    VAL_MACRO_F1,
    RunPaths,
)
from histotoken.io import atomic_write_json, atomic_write_text, read_json

logger = logging.getLogger(__name__)

# Settings that may differ when a run is resumed (they do not change its results).
RESUMABLE_DIFFERENCES = {
    "devices", "accelerator", "strategy", "num_nodes", "num_workers", "logger", "logger_uri", "checkpoint_interval_s",
}


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    already_finished: bool
    best: dict[str, Any]
    evaluation: dict[str, Any] | None


def read_status(paths: RunPaths) -> dict[str, Any]:
    if paths.status.is_file():
        return read_json(paths.status)
    return {"state": STATE_NEW, "error": None, "stages_done": []}


def write_status(paths: RunPaths, **changes: Any) -> dict[str, Any]:
    """Update status.json (only the first process of a multi-process run writes)."""
    status = {**read_status(paths), **changes}
    if is_global_zero():
        atomic_write_json(paths.status, status)
    return status


def check_same_config(paths: RunPaths, config: RunConfig) -> None:
    """A run folder belongs to one configuration; refuse to mix two in one folder."""
    if not paths.config.is_file():
        return
    old = yaml.safe_load(paths.config.read_text()) or {}
    new = config.to_dict()
    defaults = RunConfig().to_dict()  # settings added after the run was written compare as their default
    changed = [k for k in new if k not in RESUMABLE_DIFFERENCES and old.get(k, defaults[k]) != new[k]]
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed[:4])
        raise ValueError(
            f"{paths.root} already holds a run with another configuration ({details}). "
            "Choose a new --out folder, or delete the old one to start over."
        )


def prepare_split(config: RunConfig, paths: RunPaths) -> pd.DataFrame:
    """The run's frozen split: reuse RUN_DIR/splits.csv, else copy --splits, else make one."""
    if paths.splits.is_file():
        return read_split(paths.splits)
    if config.splits:
        split = read_split(config.splits)
    else:
        from histotoken.data.index import load_index

        index = load_index(config.data, data_format=config.data_format, groups=config.groups).frame
        split = make_split(
            index, config.split_scheme, config.val_fraction, config.test_fraction,
            config.folds, config.fold, config.seed,
        )
    if is_global_zero():
        write_split(split, paths.splits)
    return split


def stage_plan(config: RunConfig, num_stages: int) -> list[int]:
    """Epochs per training stage."""
    if config.stage_epochs is not None:
        if len(config.stage_epochs) != num_stages:
            raise ValueError(
                f"stage_epochs {list(config.stage_epochs)} gives {len(config.stage_epochs)} stages, "
                f"but model {config.model} trains in {num_stages}; give {num_stages} numbers, e.g. --stages 3,12"
            )
        return list(config.stage_epochs)
    if num_stages == 1:
        return [config.epochs]
    first = max(1, config.epochs // 4)  # stage 1 (e.g. the token scorer) needs fewer epochs
    rest = max(1, config.epochs - first * (num_stages - 1))
    return [first] * (num_stages - 1) + [rest]


def train(
    config: RunConfig,
    run_dir: str | Path,
    progress_bar: bool | None = None,
    extra_callbacks: list | None = None,
) -> TrainResult:
    """Train one model and evaluate it in-domain; resumable and idempotent.

    ``extra_callbacks`` are Lightning callbacks added to every stage's Trainer (e.g. a logger).
    """
    import lightning as L

    from histotoken.engine.allocator import keep_freed_memory
    from histotoken.engine.environment import describe_environment

    keep_freed_memory()  # freed step memory stays with the process: no page faults every epoch
    paths = RunPaths(Path(run_dir))
    if config.data:
        config = dataclasses.replace(config, data=str(Path(config.data).expanduser().resolve()))
    if config.splits:
        config = dataclasses.replace(config, splits=str(Path(config.splits).expanduser().resolve()))
    if config.stain_target:
        config = dataclasses.replace(config, stain_target=str(Path(config.stain_target).expanduser().resolve()))
    check_same_config(paths, config)
    status = read_status(paths)
    if status["state"] == STATE_FINISHED:
        logger.info("%s is a finished run; nothing to do (delete it to train again)", paths.root)
        best = read_json(paths.best_meta) if paths.best_meta.is_file() else {}
        return TrainResult(paths.root, True, best, None)
    if not config.data and not config.splits:
        raise ValueError("no data: give --data DATA_ROOT (the folder that holds BreaKHis_v1) or --splits FILE")

    from histotoken.engine.run_lock import run_lock

    if is_global_zero():
        paths.root.mkdir(parents=True, exist_ok=True)
    with run_lock(paths.root, "train"):  # one writer per run folder: a second process is refused
        if read_status(paths)["state"] == STATE_FINISHED:  # finished while we waited to look
            return TrainResult(paths.root, True, read_json(paths.best_meta) if paths.best_meta.is_file() else {}, None)
        previous = read_status(paths)
        if previous["state"] == STATE_RUNNING:  # we hold the lock, so its writer is gone
            logger.warning(
                "%s: the previous attempt stopped without recording why (killed with SIGKILL, out of memory, "
                "or a crash such as SIGBUS/SIGSEGV); resuming from its last saved epoch", paths.root,
            )
        if is_global_zero():
            paths.root.mkdir(parents=True, exist_ok=True)
            write_run_config(config, paths.config)
            atomic_write_json(paths.environment, describe_environment(config.seed))
        write_status(paths, state=STATE_RUNNING, error=None)
        try:
            result = _train(config, paths, L, progress_bar, extra_callbacks or [])
        except (RunInterrupted, KeyboardInterrupt, SystemExit) as error:
            # SIGTERM/SIGINT (RunInterrupted under the CLI), Ctrl-C in library use, or Lightning's own
            # SIGTERM exception: the run stays resumable from last.ckpt.
            _record_end(paths, STATE_INTERRUPTED, error)
            if isinstance(error, RunInterrupted):
                raise
            raise RunInterrupted(signal.SIGTERM if type(error).__name__ == "SIGTERMException" else signal.SIGINT) from error
        except BaseException as error:
            _record_end(paths, STATE_FAILED, error)
            raise
        write_status(paths, state=STATE_FINISHED, error=None, best_epoch=result.best.get("epoch"))
        return result


def _record_end(paths: RunPaths, state: str, error: BaseException) -> None:
    """Mark the run ``state``; if even that write fails (full disk), say so rather than hide the first error."""
    try:
        write_status(paths, state=state, error=f"{type(error).__name__}: {error}")
    except OSError as write_error:
        logger.error("could not record %s in %s (%s); it may still say running", state, paths.status, write_error)


def _train(config: RunConfig, paths: RunPaths, L, progress_bar: bool | None, extra_callbacks: list) -> TrainResult:
    from histotoken.data.dataset import ImageStore
    from histotoken.data.sources import resolve_kind, task_classes
    from histotoken.data.transforms import model_normalisation
    from histotoken.engine.inference import resolve_accelerator
    from histotoken.engine.precision import resolve_precision
    from histotoken.models.factory import create_model, parse_model_spec

    L.seed_everything(config.seed, workers=True, verbose=False)
    split = prepare_split(config, paths)
    names, column = task_classes(config.task, config.data or None, config.data_format, split)
    spec = parse_model_spec(config.model)
    model = create_model(
        spec, len(names), config.img_size, config.pretrained, config.weights, config.merge_r
    )
    mean, std = model_normalisation(model)
    domain = domain_name(config.train_domain)
    frames = {
        side: select_domain(split[split["split"] == side], domain, f"the {side} split of {paths.splits}")
        for side in ("train", "val")
    }
    from histotoken.data.stain import run_stain_normaliser

    # Stain normalisation runs once per image, when the store is built; the target is kept in the run folder.
    preprocess, preprocess_key = run_stain_normaliser(config.stain_norm, config.stain_target, paths.root)
    stores = {
        side: ImageStore.build(frame, config.img_size, universe=split, preprocess=preprocess, preprocess_key=preprocess_key)
        for side, frame in frames.items()
    }
    skipped = [s for store in stores.values() for s in store.skipped]
    if skipped and is_global_zero():
        atomic_write_text(paths.skipped, pd.DataFrame(skipped, columns=["path", "reason"]).to_csv(index=False))
        logger.warning("%d images could not be read and were left out; see %s", len(skipped), paths.skipped)

    loaders = _make_loaders(config, stores, names, column, mean, std)
    class_weights = _class_weights(stores["train"], names, column) if config.balancing == "class_weights" else None
    accelerator = resolve_accelerator(config.accelerator)
    precision = resolve_precision(config.precision, accelerator, config.img_size)
    metadata = {
        "model_name": spec.name, "model_kwargs": spec.kwargs_dict, "num_classes": len(names),
        "class_names": list(names), "class_column": column, "task": config.task, "img_size": config.img_size,
        "train_domain": domain, "merge_r": config.merge_r, "precision": precision,
        "data_format": resolve_kind(config.data or None, config.data_format, split),  # the detected source
    }
    num_stages = int(getattr(model, "num_stages", 1))
    plan = stage_plan(config, num_stages)
    status = read_status(paths)
    show_bar = sys.stderr.isatty() if progress_bar is None else progress_bar

    for stage, epochs in enumerate(plan, start=1):
        if stage in status.get("stages_done", []):
            if stage < num_stages:
                _load_safetensors(model, paths.stage_weights(stage))
            continue
        if hasattr(model, "set_stage"):
            model.set_stage(stage)
        final_stage = stage == num_stages
        trainer = _make_trainer(
            config, paths, L, stage, epochs, final_stage, metadata, accelerator, precision, show_bar, extra_callbacks
        )
        from histotoken.engine.module import ClassifierModule

        module = ClassifierModule(
            model, names, config.lr, config.weight_decay, config.warmup_epochs, epochs,
            class_weights, config.label_smoothing, stage, config.layer_decay,
        )
        ckpt_path = str(paths.last_ckpt) if usable_checkpoint(paths.last_ckpt, stage) else None
        if ckpt_path:
            logger.info("resuming stage %d from %s", stage, ckpt_path)
        logger.info(
            "training %s (%s, train domain %s) stage %d/%d: up to %d epochs on %d images, precision %s",
            spec.label, config.task, domain, stage, num_stages, epochs, len(stores["train"].frame), precision,
        )
        trainer.fit(module, loaders["train"], loaders["val"], ckpt_path=ckpt_path)
        if not final_stage and trainer.is_global_zero:
            from histotoken.engine.callbacks import save_weights

            save_weights(model, paths.stage_weights(stage))
        trainer.strategy.barrier("stage-end")  # every process sees the best/stage weights before going on
        status = write_status(paths, stages_done=sorted({*status.get("stages_done", []), stage}))
        if trainer.is_global_zero:  # last.ckpt only ever belongs to an unfinished stage (removed once it is done)
            paths.last_ckpt.unlink(missing_ok=True)

    best = read_json(paths.best_meta)
    from histotoken.engine.evaluate import evaluate_run

    evaluation = evaluate_run(paths.root, domain, n_bootstrap=config.bootstrap)
    return TrainResult(paths.root, False, best, evaluation)


def usable_checkpoint(path: Path, stage: int) -> bool:
    """True when ``path`` is a complete checkpoint to resume from; a torn one is set aside and reported.

    A kill during the write of last.ckpt can leave a truncated file. torch.save writes a zip archive
    whose central directory comes last, so a truncated file fails to open as a zip. The stage then
    restarts from its beginning (its metrics.csv rows are rewritten as the epochs run again).
    """
    import zipfile

    if not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
        return True
    except (zipfile.BadZipFile, OSError) as error:
        torn = path.with_name(path.name + ".torn")
        if is_global_zero():
            path.replace(torn)
        logger.warning(
            "%s is incomplete (%s), probably cut off by a kill while it was written; moved it to %s and "
            "restarting stage %d from its first epoch", path, error, torn.name, stage,
        )
        return False


def _make_loaders(config, stores, names, column, mean, std):
    from torch.utils.data import DataLoader, WeightedRandomSampler

    from histotoken.data.dataset import ImageDataset
    from histotoken.data.transforms import eval_transform, train_transform

    train_set = ImageDataset(stores["train"], names, column, train_transform(config.img_size, mean, std, config.stain_augment))
    val_set = ImageDataset(stores["val"], names, column, eval_transform(mean, std))
    generator = torch.Generator().manual_seed(config.seed)
    sampler = None
    if config.balancing == "sampler":
        counts = torch.bincount(train_set.targets, minlength=len(names)).clamp(min=1)
        sampler = WeightedRandomSampler(1.0 / counts[train_set.targets], len(train_set), generator=generator)
    common = {"batch_size": config.batch_size, "num_workers": config.num_workers, "persistent_workers": config.num_workers > 0}
    return {
        "train": DataLoader(
            train_set, shuffle=sampler is None, sampler=sampler, generator=generator,
            drop_last=len(train_set) > config.batch_size, **common,
        ),
        "val": DataLoader(val_set, shuffle=False, **common),
    }


def _class_weights(store, names, column) -> torch.Tensor:
    """Inverse-frequency class weights (mean 1 over present classes) for an imbalanced training set."""
    counts = store.frame[column].value_counts().reindex(names, fill_value=0).to_numpy()
    weights = torch.tensor([len(store.frame) / (len(names) * c) if c else 0.0 for c in counts], dtype=torch.float32)
    return weights


def _make_trainer(config, paths, L, stage, epochs, final_stage, metadata, accelerator, precision, show_bar, extra_callbacks):
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    from histotoken.engine.callbacks import (
        BestWeightsSaver,
        EpochMetricsWriter,
        EpochProgressBar,
        LastCheckpoint,
    )

    best = BestWeightsSaver(paths.checkpoints, metadata, stage) if final_stage else None
    last = LastCheckpoint(paths.last_ckpt, config.checkpoint_interval_s, best)
    callbacks = [
        *([EpochProgressBar()] if show_bar else []),
        # metrics.csv's row, then last.ckpt (kept or written): a kill -9 between the two re-runs the epoch
        EpochMetricsWriter(paths.metrics, stage, after_row=last.epoch_end),
        last,
        *extra_callbacks,
    ]
    if best is not None:
        callbacks.append(best)
        callbacks.append(EarlyStopping(monitor=VAL_MACRO_F1, mode="max", patience=config.early_stopping_patience))
    from histotoken.engine.inference import route_lightning_logging

    route_lightning_logging()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator=accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        precision=precision,
        gradient_clip_val=config.grad_clip or None,
        callbacks=callbacks,
        logger=make_logger(config, paths, stage),
        # last.ckpt (weights + optimiser state, 134 MB for ResNet-18) is written by a background thread
        # (atomically) while training goes on; see LastCheckpoint for when.
        plugins=[AsyncCheckpointIO()],
        default_root_dir=paths.root,
        enable_progress_bar=show_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic="warn",
    )
    # Deterministic algorithms, without their debugging aid of filling every new tensor with NaN: no
    # op here reads memory it did not write, and the fill cost DeiT-Tiny at 224 px 12% of its epoch.
    torch.utils.deterministic.fill_uninitialized_memory = False
    return trainer


def make_logger(config: RunConfig, paths: RunPaths, stage: int):
    """The experiment logger the user asked for (Lightning's), or False; metrics.csv is written either way.

    csv and tensorboard write under RUN_DIR/logs/, one version per training stage; mlflow logs to a
    local file store in RUN_DIR/mlruns unless ``logger_uri`` names a tracking server; wandb uses the
    user's wandb settings. tensorboard, mlflow and wandb are optional extras.
    """
    if config.logger == "none":
        return False
    name, version = config.logger, f"stage{stage}"
    try:
        if name == "csv":
            from lightning.pytorch.loggers import CSVLogger

            return CSVLogger(save_dir=paths.root, name="logs", version=f"csv_{version}")
        if name == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            return TensorBoardLogger(save_dir=paths.root, name="logs", version=f"tensorboard_{version}")
        if name == "mlflow":
            from lightning.pytorch.loggers import MLFlowLogger

            uri = config.logger_uri
            if not uri:  # a local file store in the run folder (recent MLflow asks for this opt-in)
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                uri = (paths.root / "mlruns").resolve().as_uri()
            return MLFlowLogger(experiment_name="histotoken", run_name=f"{paths.root.name}-{version}", tracking_uri=uri)
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(project="histotoken", name=f"{paths.root.name}-{version}", save_dir=str(paths.root))
    except (ImportError, ModuleNotFoundError) as error:
        raise ValueError(
            f"--logger {name} needs an optional package ({error}); install it with "
            f"`pip install 'histotoken[loggers]'` or choose --logger csv"
        ) from error


def _load_safetensors(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))
