"""Inference through Lightning: the run's accelerator, devices and precision, every image exactly once.

``predict_logits(model, dataset)`` is what every evaluation, prediction and explanation uses.
It runs ``Trainer.predict``, so it goes wherever training went (CPU, one GPU, several GPUs or
nodes) with the same mixed precision. The dataset yields ``(uint8 image, target)`` pairs; images
are normalised as a batch on the device (one fused operation instead of one transform per image).

Under several processes Lightning's prediction sampler gives each process a share of the images
(without repeats, but the shares may differ by one). Each process pads its share to the same
length, all shares are gathered, and rows are put back in dataset order by their index; any index
seen twice is kept once, so a padding sampler could not count an image twice either.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

logger = logging.getLogger(__name__)


class IndexedDataset(Dataset):
    """``(image, target, index)`` from a dataset of ``(image, target)``: the index survives any sampler."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image, target = self.dataset[index]
        return image, target, index


class BatchNormalise(torch.nn.Module):
    """uint8 (B, 3, H, W) -> float, scaled to [0, 1] and normalised with the model's mean and std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            return (images.float() - self.mean) / self.std
        return images  # already a normalised float batch


class PredictionModule(L.LightningModule):
    """Wraps a model for ``Trainer.predict``: normalise on the device, return float32 logits and indices."""

    def __init__(self, model: torch.nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.normalise = BatchNormalise(mean, std)
        self._logits: list[torch.Tensor] = []
        self._indices: list[torch.Tensor] = []

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        images, _, indices = batch
        logits = self.model(self.normalise(images)).float()
        self._logits.append(logits.detach())
        self._indices.append(torch.as_tensor(indices, device=logits.device))

    def on_predict_epoch_end(self) -> None:
        self.gathered = gather_in_order(self, self._logits, self._indices)
        self._logits, self._indices = [], []


def gather_in_order(
    module: L.LightningModule, logits: list[torch.Tensor], indices: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """All processes' (logits, indices), padded to one length, gathered, de-duplicated, sorted by index."""
    device = module.device
    local_logits = torch.cat(logits) if logits else torch.zeros(0, 0, device=device)
    local_index = torch.cat(indices).long() if indices else torch.zeros(0, dtype=torch.long, device=device)
    world = module.trainer.world_size if module._trainer is not None else 1
    if world > 1:
        # Shares may differ in length: pad each to the longest with index -1, then gather.
        length = torch.tensor([len(local_index)], device=device)
        longest = int(module.all_gather(length).max())
        num_classes = torch.tensor([local_logits.shape[1] if local_logits.numel() else 0], device=device)
        width = int(module.all_gather(num_classes).max())
        padded_logits = torch.zeros(longest, width, device=device)
        padded_index = torch.full((longest,), -1, dtype=torch.long, device=device)
        padded_logits[: len(local_index)] = local_logits.reshape(len(local_index), width)
        padded_index[: len(local_index)] = local_index
        local_logits = module.all_gather(padded_logits).reshape(-1, width)  # (world * longest, C)
        local_index = module.all_gather(padded_index).reshape(-1)
    keep = local_index >= 0
    local_logits, local_index = local_logits[keep], local_index[keep]
    order = torch.argsort(local_index, stable=True)
    local_logits, local_index = local_logits[order], local_index[order]
    first = torch.ones_like(local_index, dtype=torch.bool)
    first[1:] = local_index[1:] != local_index[:-1]  # an index seen twice (a padding sampler) counts once
    return local_logits[first].cpu(), local_index[first].cpu()


def resolve_accelerator(accelerator: str = "auto") -> str:
    """``auto`` -> ``gpu`` when CUDA is available, else ``cpu``."""
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return accelerator


def route_lightning_logging() -> None:
    """Lightning's log records go through the application's handlers only, when it has configured any.

    On import, the ``lightning`` package adds its own console handler to the ``lightning`` logger,
    which also propagates to the root logger: under an application that configured logging (the
    command line does), every Lightning message ("GPU available: ...") was printed twice, and once
    more for every Trainer. Called before each Trainer is built; does nothing when the root logger
    has no handlers (Lightning's own handler is then the only one).
    """
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lightning_logger = logging.getLogger(name)
        for handler in list(lightning_logger.handlers):
            lightning_logger.removeHandler(handler)
        lightning_logger.propagate = True


def make_trainer(
    accelerator: str = "auto",
    devices: int | str = 1,
    precision: str = "32-true",
    strategy: str = "auto",
    **options: Any,
) -> L.Trainer:
    """A quiet Trainer for inference (no logger, no checkpoints, no progress bar unless asked)."""
    route_lightning_logging()
    return L.Trainer(
        accelerator=resolve_accelerator(accelerator),
        devices=devices,
        precision=precision,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=options.pop("enable_progress_bar", False),
        **options,
    )


def predict_logits(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 64,
    accelerator: str = "auto",
    devices: int | str = 1,
    precision: str = "32-true",
    strategy: str = "auto",
    num_workers: int = 0,
) -> torch.Tensor:
    """(N, C) float32 logits on the CPU, in dataset order, one row per item of ``dataset``.

    ``dataset`` yields ``(image, target)`` with images as uint8 (3, H, W) tensors (normalised here
    with ``mean``/``std`` in [0, 1] units, as timm data configs give them) or already-normalised floats.
    Every process of a multi-device run gets the full result.
    """
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("nothing to predict: the dataset is empty")
    from histotoken.engine.allocator import keep_freed_memory

    keep_freed_memory()
    module = PredictionModule(model, mean, std)
    loader = DataLoader(
        IndexedDataset(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        persistent_workers=False,
    )
    trainer = make_trainer(accelerator, devices, precision, strategy)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():  # predict_step keeps its outputs itself, on purpose
            warnings.filterwarnings("ignore", message=".*predict returned None.*")
            trainer.predict(module, loader, return_predictions=False)
    finally:
        model.train(was_training)
    logits, indices = module.gathered
    expected = torch.arange(len(dataset))  # type: ignore[arg-type]
    if len(indices) != len(expected) or not torch.equal(indices, expected):
        raise RuntimeError(
            f"prediction covered {len(indices)} of {len(expected)} images; this is a bug in the "
            "multi-process gathering, please report it"
        )
    return logits
