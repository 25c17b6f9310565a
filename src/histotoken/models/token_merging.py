"""Token merging (ToMe) for any timm ``VisionTransformer``, applied with hooks, not copied code.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (https://arxiv.org/abs/2210.09461).
The algorithm lives in :mod:`histotoken.layers.token_merging`; this module attaches it to a model.

How it is attached, and why:

- The reference implementation replaced timm's ``Block`` and ``Attention`` forward methods with
  copies, which broke with every timm release. Here the blocks run their own, unchanged forward.
  A forward *pre-hook* on every block merges the residual stream ``x`` at the block's input and
  passes ``attn_mask = log(size)`` (proportional attention) to the block, which hands it to its
  attention as an additive bias (``Block.forward(x, attn_mask=None)`` in the timm 1.0.x in use;
  blocks of older releases take no mask and merge without proportional attention, with a
  warning). The module
  tree and the ``state_dict`` keys stay exactly those of the plain model, so checkpoints load
  either way.
- Placement: the paper merges inside each block, between attention and MLP. Merging at the
  block's *input* instead lets the whole block (attention and MLP) work on the reduced set, so the
  saving is a little larger for the same ``r``; block ``i`` processes ``N - (i + 1) * r`` tokens.
- Similarity metric (``metric="keys"``, default): the paper's best choice, the attention keys
  (averaged over heads). A forward hook on ``block.attn.qkv`` keeps the keys of each block; the next
  block's input holds exactly those tokens, so the next merge uses them. The first block has no
  keys yet and uses its input tokens, as does any block whose attention has no fused ``qkv``
  layer. ``metric="tokens"`` uses the block's input tokens everywhere (no qkv hook).
- Kept tokens stay in their input order; a merged token takes its B token's place.
- ``r`` is clipped per block to half the mergeable tokens (rounded down), so at least the prefix
  tokens plus one token always remain (:func:`histotoken.layers.token_merging.max_merge_per_step`).
  An ``r`` the first block cannot apply (more than half the patches) is an error.
- ``r = 0`` registers no merging and no mask: the output is bit-identical to the plain model's.
- After every forward, ``model.tokens_per_block`` lists the tokens each block processed (prefix
  tokens included).

Limits: gradient checkpointing (``set_grad_checkpointing``) re-runs blocks out of order and is not
supported with ``r > 0`` (a clear error); average-pooling heads (``global_pool="avg"``) average the merged tokens
without their sizes; a caller-supplied ``attn_mask`` cannot be combined with merging;
``forward_intermediates`` returns merged (shorter) token sets, which cannot be reshaped to a grid.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from histotoken.layers.token_merging import (
    bipartite_soft_matching,
    max_merge_per_step,
    proportional_attention_bias,
)

logger = logging.getLogger(__name__)

METRICS = ("keys", "tokens")


class _MergeState:
    """What one forward pass carries from block to block (reset by the first block)."""

    def __init__(self, model: nn.Module, r: int, metric: str, proportional_attention: bool) -> None:
        self.model = model
        self.r = r
        self.metric = metric
        self.proportional_attention = proportional_attention
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        self.size: torch.Tensor | None = None  # (B, N, 1) patches per token; None = all ones
        self.keys: torch.Tensor | None = None  # (B, N, head_dim) keys of the previous block
        self.handles: list[torch.utils.hooks.RemovableHandle] = []


class _BeforeBlock:
    """Forward pre-hook of block ``index``: merge the block's input, pass ``log(size)`` as a mask."""

    def __init__(self, state: _MergeState, index: int) -> None:
        self.state = state
        self.index = index

    def __call__(self, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self.state
        x = args[0]  # (B, N, C) residual stream
        if self.index == 0:
            state.size, state.keys = None, None
            state.model.tokens_per_block = []
            if state.r > 0 and getattr(state.model, "grad_checkpointing", False) and torch.is_grad_enabled():
                raise ValueError(
                    "token merging does not work with gradient checkpointing (blocks are re-run out of "
                    "order); call model.set_grad_checkpointing(False) or train with merge_r=0"
                )
        if state.r > 0 and (len(args) > 1 or kwargs.get("attn_mask") is not None or kwargs.get("is_causal")):
            raise ValueError(
                "token merging cannot combine with a caller-supplied attn_mask or is_causal; "
                "call the model without them or remove_token_merging(model) first"
            )
        r = min(state.r, max_merge_per_step(x.shape[1], state.num_prefix_tokens))
        if r > 0:
            keys = state.keys
            metric = keys if keys is not None and keys.shape[:2] == x.shape[:2] else x
            merge = bipartite_soft_matching(metric, r, state.num_prefix_tokens)
            x, state.size = merge(x, state.size)  # (B, N, C) -> (B, N - r, C), sizes (B, N - r, 1)
        state.keys = None
        state.model.tokens_per_block.append(int(x.shape[1]))
        if r == 0 and state.size is None:
            return None  # nothing merged yet: run the block exactly as without merging
        if state.proportional_attention and state.size is not None:
            kwargs = dict(kwargs, attn_mask=proportional_attention_bias(state.size, _logits_dtype(x)))
        return (x, *args[1:]), kwargs


class _KeepKeys:
    """Forward hook on ``attn.qkv``: keep this block's keys, averaged over heads, as the next metric."""

    def __init__(self, state: _MergeState, num_heads: int, head_dim: int) -> None:
        self.state = state
        self.num_heads = num_heads
        self.head_dim = head_dim

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        # timm's fused qkv output is laid out as (B, N, 3, heads, head_dim); index 1 is the keys
        qkv = output.detach().unflatten(-1, (3, self.num_heads, self.head_dim))  # (B, N, 3, H, D)
        self.state.keys = qkv[:, :, 1].mean(dim=2)  # (B, N, D)


def _keys_hook(state: _MergeState, attn: nn.Module | None) -> _KeepKeys | None:
    """A key-keeping hook for a timm-style fused ``qkv`` attention; ``None`` (tokens metric) otherwise."""
    qkv = getattr(attn, "qkv", None)
    num_heads, head_dim = getattr(attn, "num_heads", None), getattr(attn, "head_dim", None)
    if not isinstance(qkv, nn.Linear) or not num_heads or not head_dim:
        return None
    if qkv.out_features != 3 * num_heads * head_dim:
        return None
    return _KeepKeys(state, int(num_heads), int(head_dim))


def _logits_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention logits will have: the autocast dtype if autocast is on, else ``x``'s."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _check_vision_transformer(model: nn.Module) -> None:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"token merging needs a timm VisionTransformer (vit_*, deit_*); got {type(model).__name__}. "
            "Use merge_r only with ViT/DeiT models."
        )


def _accepts_attn_mask(block: nn.Module) -> bool:
    return "attn_mask" in inspect.signature(block.forward).parameters


def apply_token_merging(
    model: nn.Module, r: int, metric: str = "keys", proportional_attention: bool = True
) -> nn.Module:
    """Make ``model`` (a timm ``VisionTransformer``) merge ``r`` tokens before each block.

    Args:
        model: a timm ``VisionTransformer`` (any ``vit_*``/``deit_*``, with any number of prefix
            tokens); modified in place and returned. Applying again replaces the earlier setting.
        r: tokens merged away before every block (clipped per block, see module docstring).
        metric: ``"keys"`` (attention keys of the previous block) or ``"tokens"`` (block inputs).
        proportional_attention: add ``log(size)`` to the attention logits (paper, Sec. 3).

    Raises:
        ValueError: ``model`` is not a timm VisionTransformer, ``r`` is negative or larger than
            half the patch tokens, or ``metric`` is unknown.
    """
    _check_vision_transformer(model)
    r = int(r)
    if metric not in METRICS:
        raise ValueError(f"unknown token-merging metric {metric!r}; choose one of {', '.join(METRICS)}")
    num_patches = int(model.patch_embed.num_patches)
    limit = num_patches // 2
    if r < 0 or r > limit:
        raise ValueError(
            f"merge_r={r} does not fit this model: it has {num_patches} patch tokens, so one block can "
            f"merge at most {limit}; choose 0 <= merge_r <= {limit} (later blocks clip r automatically)"
        )
    remove_token_merging(model)
    blocks = list(model.blocks)
    if proportional_attention and r > 0 and not all(_accepts_attn_mask(block) for block in blocks):
        logger.warning(
            "the blocks of this %s take no attn_mask (timm < 1.0.16?): merging without proportional attention",
            type(model).__name__,
        )
        proportional_attention = False

    state = _MergeState(model, r, metric, proportional_attention)
    for index, block in enumerate(blocks):
        state.handles.append(block.register_forward_pre_hook(_BeforeBlock(state, index), with_kwargs=True))
        is_last = index == len(blocks) - 1
        if r > 0 and metric == "keys" and not is_last:
            keep_keys = _keys_hook(state, getattr(block, "attn", None))
            if keep_keys is not None:
                state.handles.append(block.attn.qkv.register_forward_hook(keep_keys))
    model._token_merging = state
    model.merge_r = r
    model.tokens_per_block = []
    return model


def remove_token_merging(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_token_merging`: remove its hooks; the model is the plain model again."""
    state = getattr(model, "_token_merging", None)
    if state is not None:
        for handle in state.handles:
            handle.remove()
        del model._token_merging
        model.merge_r = 0
    return model
