"""One LightningModule for every classifier; the model itself stays a plain ``nn.Module``.

Models may add auxiliary losses by defining ``compute_loss(logits, target, criterion)`` (e.g. the
CNN-pruned ViT's scorer and keep-rate terms); the module uses it when present.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from timm.scheduler import CosineLRScheduler
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, layer_decay: float | None = None
) -> torch.optim.Optimizer:
    """AdamW as DeiT and timm train ViTs, built by timm's optimiser factory.

    No weight decay on 1-D parameters (norms, biases), nor on what the model lists in
    ``no_weight_decay()`` (position embeddings, class/distillation tokens); frozen parameters
    (e.g. a stage that trains only the token scorer) are left out. ``layer_decay`` scales each
    block's learning rate by ``layer_decay ** (depth - layer)`` (BEiT/DeiT fine-tuning); it needs
    the model's ``group_matcher``, which timm's ViTs, ResNets, Swin and Mixers have.
    """
    from timm.optim import create_optimizer_v2

    if layer_decay is not None and not hasattr(model, "group_matcher"):
        raise ValueError(
            f"layer_decay needs a model that groups its parameters into layers (group_matcher); "
            f"{type(model).__name__} has none. Leave layer_decay unset for this model."
        )
    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay, layer_decay=layer_decay)


class ClassifierModule(L.LightningModule):
    """Cross-entropy training with AdamW, cosine schedule with warm-up and per-stage metrics."""

    def __init__(
        self,
        model: torch.nn.Module,
        class_names: Sequence[str],
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        warmup_epochs: int = 1,
        max_epochs: int = 30,
        class_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        stage: int = 1,
        layer_decay: float | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.class_names = list(class_names)
        self.lr, self.weight_decay = lr, weight_decay
        self.warmup_epochs, self.max_epochs = warmup_epochs, max_epochs
        self.stage = stage
        self.layer_decay = layer_decay
        self.criterion = torch.nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)
        num_classes = len(self.class_names)
        self.train_metrics = self._metrics(num_classes, "train/")
        self.val_metrics = self._metrics(num_classes, "val/")
        self.val_per_class_f1 = MulticlassF1Score(num_classes, average=None)
        # Epoch means of the losses, weighted by batch size and reduced over processes when computed.
        # Accumulated here rather than by a self.log call per step: Lightning's log costs 0.5-1 ms
        # per call on the CPU, which a step of a small model notices (benchmarks/engine_overhead.py).
        self.train_losses = torch.nn.ModuleDict({"loss": MeanMetric()})
        self.val_loss = MeanMetric()

    @staticmethod
    def _metrics(num_classes: int, prefix: str) -> MetricCollection:
        return MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "macro_f1": MulticlassF1Score(num_classes, average="macro"),
            },
            prefix=prefix,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        compute_loss = getattr(self.model, "compute_loss", None)
        if compute_loss is not None:
            return compute_loss(logits, targets, self.criterion)
        return self.criterion(logits, targets), {}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss, parts = self._loss(logits, targets)
        self.train_metrics.update(logits.detach().float(), targets)
        for name, value in {"loss": loss, **parts}.items():
            if name not in self.train_losses:  # a model's auxiliary loss, seen at its first step
                self.train_losses[name] = MeanMetric().to(loss.device)
            self.train_losses[name].update(value.detach().float(), len(targets))
        return loss

    def on_train_epoch_end(self) -> None:
        self.log_dict({f"train/{name}": mean.compute() for name, mean in self.train_losses.items()})
        self.log_dict(self.train_metrics.compute())
        self.train_metrics.reset()
        for mean in self.train_losses.values():
            mean.reset()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, targets = batch
        logits = self(images).float()
        loss, _ = self._loss(logits, targets)
        self.val_metrics.update(logits, targets)
        self.val_per_class_f1.update(logits, targets)
        self.val_loss.update(loss.detach(), len(targets))

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute())
        self.val_loss.reset()
        self.log_dict(self.val_metrics.compute())
        per_class = self.val_per_class_f1.compute()
        self.log_dict({f"val/f1/{name}": value for name, value in zip(self.class_names, per_class)})
        self.val_metrics.reset()
        self.val_per_class_f1.reset()

    def configure_optimizers(self):
        optimizer = make_optimizer(self.model, self.lr, self.weight_decay, self.layer_decay)
        scheduler = CosineLRScheduler(
            optimizer,
            t_initial=max(self.max_epochs, 1),
            lr_min=self.lr * 0.01,
            warmup_t=min(self.warmup_epochs, max(self.max_epochs - 1, 0)),
            warmup_lr_init=self.lr * 0.1,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        # timm schedulers take the epoch number rather than counting calls.
        scheduler.step(epoch=self.current_epoch + 1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["histotoken_stage"] = self.stage
