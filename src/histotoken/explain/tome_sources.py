"""Which input patches each token holds after token merging (ToMe's source tracing).

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023, section "Visualizations"
(``trace_source``): every token carries a row over the input patches, and merging two tokens adds
their rows. Here the rows ride along with the model's own merges, without changing how or where
the model merges: while :func:`merge_sources` runs one forward pass, the flag ``trace_sources`` is
set on the model's merge state (:mod:`histotoken.models.token_merging`), whose merge then also
merges the source rows. Nothing is replaced: the module's functions stay as they are. A merge is a
size-weighted average, so the rows are carried divided by their size (fractions) and multiplied
back afterwards, which turns the average into the sum ToMe traces.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def _tracking(model: nn.Module, events: list | None = None) -> Iterator[Any]:
    """Set the merge state's source-tracing flag for the block (``None``: the model does not merge)."""
    state = getattr(model, "_token_merging", None)
    if state is None:
        yield None
        return
    state.trace_sources, state.trace_events = True, events
    state.sources, state.source_size = None, None
    try:
        yield state
    finally:
        state.trace_sources, state.trace_events = False, None


def merge_sources(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, T, P) bool: token t after the last merge holds input patch p.

    Prefix tokens (class token) hold no patch; every patch belongs to exactly one token. A model
    without token merging gives the identity (every patch its own token).
    """
    with torch.no_grad(), _tracking(model) as state:
        model(images)
    num_patches = int(model.patch_embed.num_patches)
    sources = None if state is None else state.traced_sources()
    if sources is None:  # nothing merged
        p = int(getattr(model, "num_prefix_tokens", 1))
        identity = torch.zeros(images.shape[0], p + num_patches, num_patches, dtype=torch.bool)
        identity[:, p:] = torch.eye(num_patches, dtype=torch.bool)
        return identity
    state.sources, state.source_size = None, None
    return sources.cpu()


def source_label_maps(sources: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """(B, T, P) sources -> (B, gh, gw) int: the index of the token that holds each patch (-1: none)."""
    holder = torch.where(sources.any(dim=1), sources.float().argmax(dim=1), torch.full(sources.shape[::2], -1))
    return holder.reshape(-1, *grid_size)


def merged_rollout_maps(model: nn.Module, images: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Attention rollout through a ViT that merges tokens -> (B, gh, gw) maps over the input patches.

    Rollout (see :mod:`histotoken.explain.rollout`) keeps a flow matrix R (tokens x input tokens). An
    attention step maps it to ``A' R``; a merge replaces the rows of the merged tokens by their
    size-weighted average, which is the model's own merge function applied to R. Attention and merges
    are replayed in the order the forward pass ran them, wherever the model places its merges.
    """
    from histotoken.explain.maps import normalise_maps
    from histotoken.explain.rollout import recorded_attention

    events: list = []
    blocks = list(model.blocks)
    with torch.no_grad(), _tracking(model, events), recorded_attention(blocks, events):
        model(images)
    batch = images.shape[0]
    num_tokens = int(getattr(model, "num_prefix_tokens", 1)) + int(model.patch_embed.num_patches)
    flow = torch.eye(num_tokens, dtype=torch.float64).expand(batch, num_tokens, num_tokens).clone()
    for event in events:
        if event[0] == "merge":
            _, merge, size = event
            flow, _ = merge(flow, size)  # (B, T, N0) -> (B, T - r, N0): merged rows averaged by size
        else:
            mixed = event[1].double().mean(dim=1)  # (B, heads, T, T) -> (B, T, T)
            mixed = 0.5 * mixed + 0.5 * torch.eye(mixed.shape[-1], dtype=mixed.dtype)
            flow = (mixed / mixed.sum(dim=-1, keepdim=True)) @ flow
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    return normalise_maps(flow[:, 0, prefix:].reshape(batch, *grid_size))
