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

    def wrap(self, matcher):
        def matching(metric: torch.Tensor, r: int, num_prefix_tokens: int = 1):
            merge = matcher(metric, r, num_prefix_tokens)

            def merge_with_sources(x: torch.Tensor, size: torch.Tensor | None = None):
                if size is None or self.fractions is None or self.fractions.shape[1] != x.shape[1]:
                    self.start(x)  # first merge of a forward pass: every patch token is its own source
                self.fractions, self.size = merge(self.fractions, self.size)
                return merge(x, size)

            return merge_with_sources

        return matching

    @property
    def sources(self) -> torch.Tensor:
        return (self.fractions * self.size).round().to(torch.bool)  # (B, T, P)


@contextlib.contextmanager
def _tracking(model: nn.Module) -> Iterator[_SourceTracker]:
    tracker = _SourceTracker(int(getattr(model, "num_prefix_tokens", 1)), int(model.patch_embed.num_patches))
    original = token_merging_module.bipartite_soft_matching
    token_merging_module.bipartite_soft_matching = tracker.wrap(original)
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
