"""Which input patches each token holds after token merging (ToMe's source tracing).

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023, section "Visualizations"
(``trace_source``): every token carries a row over the input patches, and merging two tokens adds
their rows. Here the rows ride along with the model's own merges, without changing how or where
the model merges: while :func:`merge_sources` runs one forward pass, the matching function that
:mod:`histotoken.models.token_merging` calls is wrapped so that each merge it returns also merges
the source rows. A merge is a size-weighted average, so the rows are carried divided by their size
(fractions) and multiplied back afterwards, which turns the average into the sum ToMe traces.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

import histotoken.models.token_merging as token_merging_module


class _SourceTracker:
    def __init__(self, num_prefix_tokens: int, num_patches: int) -> None:
        self.num_prefix_tokens = num_prefix_tokens
        self.num_patches = num_patches
        self.fractions: torch.Tensor | None = None  # (B, T, P): source rows divided by token size
        self.size: torch.Tensor | None = None  # (B, T, 1)

    def start(self, x: torch.Tensor) -> None:
        batch, tokens = x.shape[:2]
        p = self.num_prefix_tokens
        fractions = torch.zeros(batch, tokens, self.num_patches, dtype=torch.float64, device=x.device)
        fractions[:, p:] = torch.eye(self.num_patches, dtype=torch.float64, device=x.device)
        self.fractions = fractions
        self.size = torch.ones(batch, tokens, 1, dtype=torch.float64, device=x.device)

    def wrap(self, matcher, events: list | None = None):
        """``matcher`` whose merges also merge the source rows (and are appended to ``events``, if given)."""

        def matching(metric: torch.Tensor, r: int, num_prefix_tokens: int = 1):
            merge = matcher(metric, r, num_prefix_tokens)

            def merge_with_sources(x: torch.Tensor, size: torch.Tensor | None = None):
                if size is None or self.fractions is None or self.fractions.shape[1] != x.shape[1]:
                    self.start(x)  # first merge of a forward pass: every patch token is its own source
                if events is not None:
                    events.append(("merge", merge, self.size))
                self.fractions, self.size = merge(self.fractions, self.size)
                return merge(x, size)

            return merge_with_sources

        return matching

    @property
    def sources(self) -> torch.Tensor:
        return (self.fractions * self.size).round().to(torch.bool)  # (B, T, P)


@contextlib.contextmanager
def _tracking(model: nn.Module, events: list | None = None) -> Iterator[_SourceTracker]:
    tracker = _SourceTracker(int(getattr(model, "num_prefix_tokens", 1)), int(model.patch_embed.num_patches))
    original = token_merging_module.bipartite_soft_matching
    token_merging_module.bipartite_soft_matching = tracker.wrap(original, events)
    try:
        yield tracker
    finally:
        token_merging_module.bipartite_soft_matching = original


def merge_sources(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, T, P) bool: token t after the last merge holds input patch p.

    Prefix tokens (class token) hold no patch; every patch belongs to exactly one token. A model
    without token merging gives the identity (every patch its own token).
    """
    with torch.no_grad(), _tracking(model) as tracker:
        model(images)
    num_patches = int(model.patch_embed.num_patches)
    if tracker.fractions is None:  # nothing merged
        p = tracker.num_prefix_tokens
        identity = torch.zeros(images.shape[0], p + num_patches, num_patches, dtype=torch.bool)
        identity[:, p:] = torch.eye(num_patches, dtype=torch.bool)
        return identity
    return tracker.sources.cpu()


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
