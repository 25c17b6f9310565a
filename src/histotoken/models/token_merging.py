"""Token merging (ToMe) for any timm ``VisionTransformer``, attached to the model, not copied into it.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (https://arxiv.org/abs/2210.09461).
The algorithm lives in :mod:`histotoken.layers.token_merging`; this module attaches it to a model.

Two placements (``mode``):

- ``"tome"`` (default), the paper's: every block runs attention on its tokens, then merges ``r``
  tokens of the residual stream *between attention and MLP*, matching them on that block's own
  attention keys (averaged over heads), and its MLP runs on the merged set. Block ``i``'s attention
  sees ``N - i * r`` tokens. A residual stream cannot be shortened inside timm's ``Block.forward``
  by hooks, so each block gets a per-instance ``forward`` composed from its own submodules
  (``norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2``: the pre-norm block
  ``x + drop_path(ls(attn(norm(x))))``, then the same for the MLP) with the merge in between. The
  attention is the block's own module, called with ``attn_mask = log(size)`` (proportional
  attention); a forward hook on its fused ``qkv`` layer keeps the keys for the merge.
- ``"pre_attention"``: merging at each block's *input*, matched on the previous block's keys (the
  first block matches its input tokens). The whole block then runs on the reduced set, so it saves
  a little more for the same ``r``: block ``i`` sees ``N - (i + 1) * r`` tokens. It is attached with
  forward pre-hooks only; the blocks run their unchanged forward.

Both keep the module tree and the ``state_dict`` keys of the plain model (checkpoints load either
way) and are undone by :func:`remove_token_merging`.

Common rules:

- Proportional attention (``softmax(q k^T / sqrt(d) + log size)``) is used at inference, and in
  training only with ``proportional_attention_in_training=True``: the authors advise training without
  it (their ``apply_patch`` docstring: it is needed only to evaluate models off the shelf).
- Similarity metric: ``metric="keys"`` (default; the paper's best choice) or ``"tokens"`` (the
  tokens being merged). A block whose attention has no fused ``qkv`` layer falls back to tokens.
- ``r`` is clipped per block to half the mergeable tokens (rounded down), so at least the prefix
  tokens plus one token always remain (:func:`histotoken.layers.token_merging.max_merge_per_step`).
  An ``r`` the first block cannot apply (more than half the patches) is an error.
- ``r = 0`` gives the plain model's output exactly (``"pre_attention"`` registers no merging;
  ``"tome"``'s composed forward performs the plain block's operations in the plain block's order).
- ``r`` may be a schedule (ToMe's ``parse_r``): a list with one ``r`` per block (missing blocks
  merge nothing), or an int with an ``inflection`` in [-1, 1] that tilts a linear ramp of mean
  ``r`` (see :func:`r_schedule`).
- The forward pass writes nothing on the model. Per-pass records come from
  :func:`histotoken.models.records.record_tokens`: ``tokens_per_block`` lists the tokens each
  block's attention processed (prefix tokens included); ``token_info["token_sizes"]`` holds the
  final (B, N, 1) sizes (patches per token) when tokens were merged.
- Source tracing (which input patches each token holds, ToMe's ``trace_source``) is a flag on the
  merge state: with ``state.trace_sources`` set, every merge also merges ``state.sources`` (see
  :mod:`histotoken.explain.tome_sources`).

Limits: gradient checkpointing (``set_grad_checkpointing``) re-runs blocks out of order and is not
supported with ``r > 0`` (a clear error); average-pooling heads (``global_pool="avg"``) average the merged tokens
without their sizes; a caller-supplied ``attn_mask`` cannot be combined with merging;
``forward_intermediates`` returns merged (shorter) token sets, which cannot be reshaped to a grid.
"""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Sequence

import torch
from torch import nn

from histotoken.layers.token_merging import (
    bipartite_soft_matching,
    max_merge_per_step,
    proportional_attention_bias,
)

logger = logging.getLogger(__name__)

METRICS = ("keys", "tokens")
MODES = ("tome", "pre_attention")
# the submodules a pre-norm timm block consists of; "tome" composes its forward from them
BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def r_schedule(r: int | Sequence[int], num_blocks: int, inflection: float = 0.0) -> list[int]:
    """Tokens to merge in each of ``num_blocks`` blocks, following ToMe's ``parse_r`` (Bolya et al., 2023).

    - A list (or tuple) gives ``r`` per block; blocks after its end merge nothing. More entries than
      blocks is an error.
    - An int ``r`` with ``inflection`` 0 merges ``r`` in every block. Otherwise the schedule is a
      straight line from ``first = int(r * (1 - inflection))`` to ``2 * r - first`` over the blocks
      (mean ``r``), each value truncated to an int: ``inflection = -1`` decreases from ``2 r`` to 0
      (the paper's "decreasing schedule"), ``+1`` increases from 0 to ``2 r``.

    Each block still clips its ``r`` to half its mergeable tokens (:func:`max_merge_per_step`).
    """
    if isinstance(r, (list, tuple)):
        if inflection:
            raise ValueError("merge inflection applies to an int r, not to a list of r per block")
        schedule = [int(value) for value in r]
        if len(schedule) > num_blocks:
            raise ValueError(f"the r schedule lists {len(schedule)} blocks but the model has {num_blocks}")
        return schedule + [0] * (num_blocks - len(schedule))
    if not -1.0 <= inflection <= 1.0:
        raise ValueError(f"merge inflection must be between -1 and 1, got {inflection}")
    r = int(r)
    if not inflection or num_blocks <= 1:
        return [r] * num_blocks
    first = int(r * (1.0 - inflection))
    step = (2 * r - 2 * first) / (num_blocks - 1)  # from first to 2 r - first
    return [int(first + step * index) for index in range(num_blocks)]


class _MergeState:
    """What one forward pass carries from block to block (reset by the first block)."""

    def __init__(
        self, model: nn.Module, r: list[int], metric: str, proportional_attention: bool, in_training: bool
    ) -> None:
        self.model = model
        self.schedule = r  # tokens to merge in each block
        self.r = max(r, default=0)  # > 0: some block merges
        self.metric = metric
        self.proportional_attention = proportional_attention
        self.proportional_attention_in_training = in_training
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        self.size: torch.Tensor | None = None  # (B, N, 1) patches per token; None = all ones
        self.keys: torch.Tensor | None = None  # (B, N, head_dim) keys of the last attention that ran
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.blocks: list[nn.Module] = []  # blocks given a composed forward ("tome")
        # set by histotoken.models.records.record_tokens: where the final token sizes go
        self.record: object | None = None
        # source tracing (histotoken.explain.tome_sources): with the flag set, every merge also merges
        # `sources`, the (B, T, P) rows over the P input patches (each divided by its token's size,
        # so that the size-weighted average of a merge adds them up), and appends
        # ("merge", merge, sizes before it) to `trace_events` when that is a list
        self.trace_sources = False
        self.trace_events: list | None = None
        self.sources: torch.Tensor | None = None  # (B, T, P) float64 source rows / token size
        self.source_size: torch.Tensor | None = None  # (B, T, 1) float64 token sizes

    def start(self) -> None:
        """First block of a forward pass: forget the previous pass."""
        self.size, self.keys = None, None
        self.sources, self.source_size = None, None
        if self.r > 0 and getattr(self.model, "grad_checkpointing", False) and torch.is_grad_enabled():
            raise ValueError(
                "token merging does not work with gradient checkpointing (blocks are re-run out of "
                "order); call model.set_grad_checkpointing(False) or train with merge_r=0"
            )

    def check_block_arguments(self, has_extra: bool) -> None:
        if self.r > 0 and has_extra:
            raise ValueError(
                "token merging cannot combine with a caller-supplied attn_mask or is_causal; "
                "call the model without them or remove_token_merging(model) first"
            )

    def attention_bias(self, x: torch.Tensor) -> torch.Tensor | None:
        """``log(size)`` for the next attention, or None (no merge yet, or not in this mode)."""
        if self.size is None or not self.proportional_attention:
            return None
        if self.model.training and not self.proportional_attention_in_training:
            return None
        return proportional_attention_bias(self.size, _logits_dtype(x))

    def merge(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Merge block ``index``'s ``r`` tokens of ``x`` (clipped), on the kept keys when they fit, else on ``x``."""
        r = min(self.schedule[index], max_merge_per_step(x.shape[1], self.num_prefix_tokens))
        if r <= 0:
            return x
        keys = self.keys
        metric = keys if keys is not None and keys.shape[:2] == x.shape[:2] else x
        merge = bipartite_soft_matching(metric, r, self.num_prefix_tokens)
        if self.trace_sources:
            self._merge_sources(merge, x)
        x, self.size = merge(x, self.size)  # (B, N, C) -> (B, N - r, C), sizes (B, N - r, 1)
        if self.record is not None:
            self.record.token_info["token_sizes"] = self.size.detach()
        return x

    def traced_sources(self) -> torch.Tensor | None:
        """(B, T, P) bool: token t of the last pass holds input patch p (``None``: nothing merged or traced)."""
        if self.sources is None or self.source_size is None:
            return None
        return (self.sources * self.source_size).round().to(torch.bool)  # fractions x size = the summed rows

    def _merge_sources(self, merge, x: torch.Tensor) -> None:
        """Apply ``merge`` to the source rows too (the first merge of a pass starts them as the identity)."""
        if self.sources is None or self.sources.shape[1] != x.shape[1]:
            batch, tokens = x.shape[:2]
            num_patches = tokens - self.num_prefix_tokens
            sources = torch.zeros(batch, tokens, num_patches, dtype=torch.float64, device=x.device)
            sources[:, self.num_prefix_tokens :] = torch.eye(num_patches, dtype=torch.float64, device=x.device)
            self.sources = sources  # (B, T, P): every patch token is its own source
            self.source_size = torch.ones(batch, tokens, 1, dtype=torch.float64, device=x.device)
        if self.trace_events is not None:
            self.trace_events.append(("merge", merge, self.source_size))
        self.sources, self.source_size = merge(self.sources, self.source_size)


class _BeforeBlock:
    """``"pre_attention"``: forward pre-hook of block ``index``: merge its input, pass ``log(size)``."""

    def __init__(self, state: _MergeState, index: int) -> None:
        self.state = state
        self.index = index

    def __call__(self, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self.state
        x = args[0]  # (B, N, C) residual stream
        if self.index == 0:
            state.start()
        state.check_block_arguments(len(args) > 1 or kwargs.get("attn_mask") is not None or bool(kwargs.get("is_causal")))
        merged = state.merge(x, self.index)
        state.keys = None
        if merged is x and state.size is None:
            return None  # nothing merged yet: run the block exactly as without merging
        bias = state.attention_bias(merged)
        if bias is not None:
            kwargs = dict(kwargs, attn_mask=bias)
        return (merged, *args[1:]), kwargs


def _tome_block_forward(
    block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
) -> torch.Tensor:
    """``"tome"``: the forward of a pre-norm block with ``r`` tokens merged between attention and MLP.

    Bound to one block instance (``block.forward``); ``block._token_merging`` holds the state and
    ``block._token_merging_index`` the block's place.
    """
    state: _MergeState = block._token_merging
    if block._token_merging_index == 0:
        state.start()
    state.check_block_arguments(attn_mask is not None or is_causal)
    state.keys = None
    attended = block.attn(block.norm1(x), attn_mask=state.attention_bias(x))  # (B, N, C); keeps keys
    x = x + block.drop_path1(block.ls1(attended))
    x = state.merge(x, block._token_merging_index)  # (B, N, C) -> (B, N - r, C), on this block's keys
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))  # (B, N - r, C)


class _KeepKeys:
    """Forward hook on ``attn.qkv``: keep the keys of the attention that just ran, averaged over heads."""

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
    model: nn.Module,
    r: int | Sequence[int],
    metric: str = "keys",
    proportional_attention: bool = True,
    mode: str | None = None,
    proportional_attention_in_training: bool = False,
    inflection: float = 0.0,
) -> nn.Module:
    """Make ``model`` (a timm ``VisionTransformer``) merge ``r`` tokens in every block (or a schedule of r).

    Args:
        model: a timm ``VisionTransformer`` (any ``vit_*``/``deit_*``, with any number of prefix
            tokens); modified in place and returned. Applying again replaces the earlier setting.
        r: tokens merged away in every block (clipped per block, see module docstring), or a list
            with one r per block (ToMe's schedule form).
        metric: ``"keys"`` (attention keys) or ``"tokens"`` (the tokens being merged).
        proportional_attention: add ``log(size)`` to the attention logits (paper, Sec. 3).
        mode: ``"tome"`` (the paper: between attention and MLP, on the block's own keys) or
            ``"pre_attention"`` (at the block input, on the previous block's keys). ``None``: the
            mode ``model`` was merged with before (so a new ``r`` keeps the placement), else ``"tome"``.
        proportional_attention_in_training: also use proportional attention while ``model.training``.
        inflection: with an int ``r``, tilt the schedule (ToMe's ``(r, inflection)``; see :func:`r_schedule`).

    Raises:
        ValueError: ``model`` is not a timm VisionTransformer, its blocks are not pre-norm timm
            blocks (``"tome"``), an ``r`` is negative or larger than half the patch tokens, the
            schedule is longer than the model, or ``metric``, ``mode`` or ``inflection`` is unknown.
    """
    _check_vision_transformer(model)
    schedule = r_schedule(r, len(model.blocks), inflection)
    mode = mode or getattr(model, "merge_mode", None) or "tome"
    if metric not in METRICS:
        raise ValueError(f"unknown token-merging metric {metric!r}; choose one of {', '.join(METRICS)}")
    if mode not in MODES:
        raise ValueError(f"unknown token-merging mode {mode!r} (merge_mode); choose one of {', '.join(MODES)}")
    num_patches = int(model.patch_embed.num_patches)
    limit = num_patches // 2
    for value in schedule:
        if value < 0 or value > limit:
            raise ValueError(
                f"merge_r={value} does not fit this model: it has {num_patches} patch tokens, so one block can "
                f"merge at most {limit}; choose 0 <= merge_r <= {limit} (later blocks clip r automatically)"
            )
    r = max(schedule, default=0)
    remove_token_merging(model)
    blocks = list(model.blocks)
    if mode == "tome":
        _check_pre_norm_blocks(blocks)
    elif proportional_attention and r > 0 and not all(_accepts_attn_mask(block) for block in blocks):
        logger.warning(
            "the blocks of this %s take no attn_mask (timm < 1.0.16?): merging without proportional attention",
            type(model).__name__,
        )
        proportional_attention = False

    state = _MergeState(model, schedule, metric, proportional_attention, proportional_attention_in_training)
    for index, block in enumerate(blocks):
        if mode == "tome":
            block._token_merging = state
            block._token_merging_index = index
            block.forward = types.MethodType(_tome_block_forward, block)
            state.blocks.append(block)
            wants_keys = r > 0 and metric == "keys"
        else:
            state.handles.append(block.register_forward_pre_hook(_BeforeBlock(state, index), with_kwargs=True))
            wants_keys = r > 0 and metric == "keys" and index < len(blocks) - 1
        if wants_keys:
            keep_keys = _keys_hook(state, getattr(block, "attn", None))
            if keep_keys is not None:
                state.handles.append(block.attn.qkv.register_forward_hook(keep_keys))
    model._token_merging = state
    model.merge_r = list(r) if isinstance(r, (list, tuple)) else int(r)
    model.merge_schedule = schedule
    model.merge_mode = mode
    return model


def _check_pre_norm_blocks(blocks: list[nn.Module]) -> None:
    from timm.models.vision_transformer import Block

    for index, block in enumerate(blocks):
        missing = [name for name in BLOCK_PARTS if not hasattr(block, name)]
        if not isinstance(block, Block) or missing:
            raise ValueError(
                f"merge_mode='tome' needs timm's pre-norm Block ({', '.join(BLOCK_PARTS)}); block {index} is "
                f"a {type(block).__name__}. Use merge_mode=pre_attention for this model."
            )


def remove_token_merging(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_token_merging`: remove its hooks and block forwards; the plain model again."""
    state = getattr(model, "_token_merging", None)
    if state is not None:
        for handle in state.handles:
            handle.remove()
        for block in state.blocks:
            del block.forward, block._token_merging, block._token_merging_index
        del model._token_merging
        model.merge_r = 0
        model.merge_schedule = []
    return model
