"""Attention rollout for timm ViT blocks (Abnar and Zuidema, "Quantifying Attention Flow in
Transformers", ACL 2020, https://arxiv.org/abs/2005.00928).

Rollout follows attention through the layers: each block's attention, averaged over heads, gets
the residual connection as an identity (``0.5 * A + 0.5 * I``, rows renormalised to sum to 1), and
the blocks' matrices are multiplied in order. The class token's row of the product says how much
each input patch flows into it; its patch columns, normalised, are the map.

The attention weights are read, not recomputed: the blocks' ``attn.fused_attn`` is switched off for
the pass (timm then computes ``softmax(q k^T)`` explicitly) and a forward hook on ``attn.attn_drop``
receives the softmaxed attention (its input). timm's forward is never copied.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from histotoken.explain.maps import normalise_maps


@contextlib.contextmanager
def recorded_attention(blocks: Sequence[nn.Module], events: list | None = None) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward pass appends each block's attention (B, heads, N, N) to the list.

    With ``events``, each attention is also appended there as ``("attention", weights)``, in call order.
    """
    attentions: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        attentions.append(args[0].detach().float())
        if events is not None:
            events.append(("attention", attentions[-1]))

    handles, fused = [], []
    try:
        for block in blocks:
            attn = block.attn
            fused.append((attn, getattr(attn, "fused_attn", False)))
            attn.fused_attn = False  # explicit softmax(q k^T), so that attn_drop sees the weights
            handles.append(attn.attn_drop.register_forward_hook(keep))
        yield attentions
    finally:
        for handle in handles:
            handle.remove()
        for attn, was_fused in fused:
            attn.fused_attn = was_fused


def rollout(attentions: Sequence[torch.Tensor], num_prefix_tokens: int = 1) -> torch.Tensor:
    """Roll attention out through ``attentions`` [(B, heads, N, N)] -> (B, N - prefix) class-token flow.

    Heads are averaged; the residual adds the identity with weight 1/2 and rows are renormalised.
    """
    if not attentions:
        raise ValueError("attention rollout needs at least one block's attention")
    flow = None
    for attention in attentions:
        mixed = attention.mean(dim=1)  # (B, heads, N, N) -> (B, N, N)
        identity = torch.eye(mixed.shape[-1], dtype=mixed.dtype, device=mixed.device)
        mixed = 0.5 * mixed + 0.5 * identity
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        if flow is not None and flow.shape != mixed.shape:
            raise ValueError(
                f"attention over {mixed.shape[-1]} tokens follows attention over {flow.shape[-1]}: rollout "
                "needs blocks that all see the same tokens, every patch of the patch grid (no token reduction)"
            )
        flow = mixed if flow is None else mixed @ flow  # later blocks act on earlier blocks' output
    return flow[:, 0, num_prefix_tokens:]  # class token's row, patch columns


def rollout_maps(
    model: nn.Module, images: torch.Tensor, grid_size: tuple[int, int], blocks: Sequence[nn.Module] | None = None
) -> torch.Tensor:
    """(B, 3, H, W) normalised images -> (B, gh, gw) rollout maps through ``blocks`` (default: all)."""
    blocks = list(model.blocks) if blocks is None else list(blocks)
    with torch.no_grad(), recorded_attention(blocks) as attentions:
        model(images)
    attentions = attentions[: len(blocks)]
    flow = rollout(attentions, int(getattr(model, "num_prefix_tokens", 1)))  # (B, N)
    if flow.shape[1] != grid_size[0] * grid_size[1]:
        raise ValueError(
            f"rollout covers {flow.shape[1]} tokens but the patch grid has {grid_size[0] * grid_size[1]}; "
            "rollout needs blocks that see every patch (no token reduction before them)"
        )
    return normalise_maps(flow.reshape(-1, *grid_size))
