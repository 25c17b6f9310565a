"""The hooks histotoken's engine looks for on a model, declared as ``typing.Protocol`` s.

Any timm model trains, evaluates and benchmarks without them; a family that has one of these
hooks gets the matching behaviour. The engine finds them by duck typing (``getattr``), so a model
needs no base class: it *satisfies* a protocol by having the members. The protocols are
``runtime_checkable``, so ``isinstance(model, StagedTraining)`` tells whether a model has the
members (their presence, not their signatures).

Who calls what, and when:

- :class:`CustomLoss` - ``engine/module.py`` (``ClassifierModule._loss``) calls
  ``model.compute_loss(logits, target, criterion)`` right after every training and validation
  forward pass, on the same batch, instead of ``criterion(logits, target)``. A model may therefore
  keep what its loss needs from that forward pass (e.g. auxiliary logits) on ``self``.
- :class:`StagedTraining` - ``engine/fit.py`` reads ``model.num_stages`` once before training and
  calls ``model.set_stage(stage)`` (1-based) before each stage's ``Trainer.fit``, and again when a
  run resumes in a later stage.
- :class:`TokenReporting` - :func:`histotoken.models.records.record_tokens` (used by
  ``engine/benchmark.py`` for token counts and by ``explain`` for token maps) calls
  ``model.record_token_info(record)`` when it opens a record; the model registers forward hooks
  that fill ``record.token_info`` and returns their handles, which the record removes when it
  closes. ``forward`` itself writes nothing (token counts need no hook from the model: the record
  counts the tokens entering each of ``model.blocks``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["CustomLoss", "StagedTraining", "TokenReporting"]


@runtime_checkable
class CustomLoss(Protocol):
    """A model that computes its own training loss (e.g. with auxiliary terms)."""

    def compute_loss(
        self, logits: torch.Tensor, target: torch.Tensor, criterion: nn.Module
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of the forward pass that produced ``logits``.

        Called by the engine after every training and validation forward pass, with the batch's
        ``target`` (B,) class indices and the run's ``criterion`` (cross-entropy with the run's
        class weights and label smoothing). Returns the scalar loss to optimise and named, detached
        parts that the engine logs as ``train/<name>``.
        """
        ...


@runtime_checkable
class StagedTraining(Protocol):
    """A model trained in several stages (e.g. a scorer warm-up before end-to-end training)."""

    num_stages: int
    """How many stages the engine runs; the epoch plan splits across them."""

    def set_stage(self, stage: int) -> None:
        """Switch to ``stage`` (1 .. ``num_stages``): freeze or unfreeze parts, change the loss.

        Called by the engine before each stage trains, and when a run resumes in that stage.
        """
        ...


@runtime_checkable
class TokenReporting(Protocol):
    """A model that reports family detail of a forward pass (kept patches, attention maps) through hooks."""

    def record_token_info(self, record: Any) -> list[torch.utils.hooks.RemovableHandle]:
        """Register forward hooks that write this family's detail into ``record.token_info``.

        ``record`` is a :class:`histotoken.models.records.TokenRecord`; the hooks write detached
        tensors (e.g. ``kept_indices``, ``scores``, ``attention_maps``). Returns the hook handles.
        """
        ...
