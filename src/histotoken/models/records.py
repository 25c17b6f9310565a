"""Per-pass records of a model (tokens each block processed, family detail), taken by forward hooks.

timm keeps ``forward`` free of side effects, and so do our families: nothing is written on the
model while it runs. Whoever wants to know what a forward pass did (the benchmark's token counts,
the explanations' token maps) records it for the passes inside a ``with`` block:

    with record_tokens(model) as record:
        model(images)
    record.tokens_per_block   # [65, 65, 9, 9]: tokens (prefix included) each block processed
    record.token_info         # family detail, e.g. {"attention_maps": (B, S, gh, gw)}

Both describe the *last* pass inside the block (``token_info`` is cleared when ``model`` is called;
a family's hooks overwrite their own keys on every pass, so calling ``forward_features`` directly
also leaves the last pass's values). Token counts come from a forward pre-hook on every
module of ``model.blocks`` that receives (B, N, C) tokens, so any timm ViT or Mixer is counted
without help; a CNN (4-D block inputs, or no ``blocks``) records none. Family detail comes from the
family's own hooks (:class:`histotoken.models.protocol.TokenReporting`), and token merging writes
its final token sizes when a record is open. Leaving the ``with`` block removes every hook.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["TokenRecord", "record_tokens"]


@dataclasses.dataclass
class TokenRecord:
    """What the last forward pass inside :func:`record_tokens` did."""

    tokens_per_block: list[int] = dataclasses.field(default_factory=list)
    """Tokens (prefix tokens included) each block processed; empty for a CNN."""

    token_info: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    """Family detail, e.g. ``kept_indices``/``scores`` (cnnprune), ``attention_maps`` (TokenLearner,
    TokenMixer), ``token_sizes`` (token merging). Tensors are detached."""

    passes: int = 0
    """Forward passes that ran inside the ``with`` block (counted at the first block)."""


def _blocks(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    return list(blocks) if isinstance(blocks, (nn.Sequential, nn.ModuleList)) else []


@contextlib.contextmanager
def record_tokens(model: nn.Module) -> Iterator[TokenRecord]:
    """Record the forward passes of ``model`` inside the ``with`` block (see module docstring)."""
    record = TokenRecord()
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def count(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if index == 0:  # the blocks of a new pass start: forget the previous counts
                record.tokens_per_block = []
                record.passes += 1
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.ndim == 3:  # (B, N, C) tokens
                record.tokens_per_block.append(int(x.shape[1]))

        return hook

    def clear(module: nn.Module, args: tuple) -> None:
        record.token_info = {}  # a new call of the model: hooks of family detail run after this

    merging = getattr(model, "_token_merging", None)
    try:
        handles.append(model.register_forward_pre_hook(clear))
        for index, block in enumerate(_blocks(model)):
            handles.append(block.register_forward_pre_hook(count(index)))
        register = getattr(model, "record_token_info", None)
        if callable(register):
            handles.extend(register(record))
        if merging is not None:
            merging.record = record
        yield record
    finally:
        for handle in handles:
            handle.remove()
        if merging is not None:
            merging.record = None
