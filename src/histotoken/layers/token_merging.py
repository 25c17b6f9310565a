"""Token merging by bipartite soft matching, as pure tensor functions.

Written from the paper, not from its code:
Bolya, Fu, Dai, Zhang, Feichtenhofer, Hoffman, "Token Merging: Your ViT But Faster", ICLR 2023
(https://arxiv.org/abs/2210.09461).

The algorithm (paper, Sec. 3):

1. Split the non-prefix tokens alternately into two sets: A at even and B at odd positions of the
   whole sequence (positions counted from 0 with the prefix tokens included, as in the authors'
   code; with one class token, A = 2, 4, 6, ... and B = 1, 3, 5, ...).
2. Score every A token against every B token with cosine similarity on a *metric* (the paper uses
   the attention keys; any per-token feature works).
3. Each A token keeps only its most similar B token (the bipartite graph's best edge).
4. The ``r`` A tokens with the most similar best match are merged into that match; the other A
   tokens and all B tokens are kept. Several A tokens may merge into the same B token.
5. Merging is a *size-weighted* average: every token carries its size (how many input patches it
   stands for), and merged features are ``sum(size * x) / sum(size)``.
6. *Proportional attention*: with sizes ``s``, attention becomes ``softmax(q k^T / sqrt(d) + log s)``,
   so a token that stands for ``s`` patches gets the attention weight of ``s`` copies of itself.
   :func:`proportional_attention_bias` builds that additive bias.

Prefix tokens (class token, distillation token, register tokens) are never in A or B, so they are
never merged; they stay first, in order. Output order: prefix, kept A tokens (in input order), B tokens
(merged or not, in input order), the order of the authors' code for models with a class token, so
that the next merge splits the same sets. ViTs carry position in the token features (position
embeddings were added at the input), so the order of tokens does not change what a block computes.

Nothing here depends on timm or Lightning; ``histotoken.models.token_merging`` applies it to timm
models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MergeFn = Callable[[torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


def max_merge_per_step(num_tokens: int, num_prefix_tokens: int) -> int:
    """The most tokens one matching step may remove: half of the non-prefix tokens (rounded down).

    Merging at most ``floor(M / 2)`` of ``M`` mergeable tokens leaves at least ``ceil(M / 2)`` of
    them, so at least ``num_prefix_tokens + 1`` tokens remain whenever ``M >= 1``.
    """
    return max(num_tokens - num_prefix_tokens, 0) // 2


def _keep_all(x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge of ``r = 0``: tokens unchanged, sizes all ones when not given."""
    if size is None:
        size = torch.ones_like(x[..., :1], dtype=torch.float32)  # (B, N, 1)
    return x, size


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix_tokens: int = 1) -> MergeFn:
    """Match tokens on ``metric`` and return a function that merges ``r`` of them.

    Args:
        metric: (B, N, C) features that decide which tokens are similar (e.g. attention keys).
        r: tokens to remove; clipped to :func:`max_merge_per_step` so tokens never run out.
        num_prefix_tokens: leading tokens (class, distillation, registers) that are never merged.

    Returns:
        ``merge(x, size=None) -> (x_merged, size_merged)``: (B, N, C), (B, N, 1) sizes (``None`` =
        all ones) -> (B, N - r, C) size-weighted averages ``sum(size * x) / sum(size)`` and
        (B, N - r, 1) summed sizes. Order: prefix, kept A tokens, then all B tokens (a merged
        token takes the place of its B token), each group in input order. ``merge`` is differentiable in ``x``; the matching
        itself is a discrete choice without gradient. With ``r == 0`` nothing is merged.
    """
    num_tokens = metric.shape[1]
    r = min(r, max_merge_per_step(num_tokens, num_prefix_tokens))
    if r <= 0:
        return _keep_all

    p = num_prefix_tokens
    a_start, b_start = p + p % 2, p + 1 - p % 2  # first even / odd position after the prefix
    with torch.no_grad():  # the matching is a discrete choice: no gradient flows through it
        # cosine similarity = dot product of unit vectors
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # (B, N, C)
        set_a, set_b = metric[:, a_start::2], metric[:, b_start::2]  # (B, Na, C), (B, Nb, C)
        num_a = set_a.shape[1]
        similarity = set_a @ set_b.transpose(1, 2)  # (B, Na, Nb)
        best_similarity, best_b = similarity.max(dim=-1)  # (B, Na) each: every A token's best B
        order = best_similarity.argsort(dim=-1, descending=True)  # most similar pairs first
        merged_a = order[:, :r]  # (B, r) indices into A
        kept_a = order[:, r:].sort(dim=-1).values  # (B, Na - r), back in input order
        # positions in x: A token i is at a_start + 2i, B token j at b_start + 2j
        moving_pos = a_start + 2 * merged_a  # (B, r) tokens that disappear into a B token
        target_b = best_b.gather(1, merged_a)  # (B, r) the B token each one joins
        target_pos = b_start + 2 * target_b
        # Index tensors are built from tensors of this batch (broadcasting, cumsum), never from its size
        # as a Python number, so a traced/ONNX-exported model keeps a dynamic batch axis.
        first = order[:, :1]  # (B, 1)
        zero = first - first  # (B, 1) zeros
        prefix_pos = zero + torch.arange(p, device=metric.device)  # (B, p)
        b_pos = zero + torch.arange(b_start, num_tokens, 2, device=metric.device)  # (B, Nb)
        keep_pos = torch.cat([prefix_pos, a_start + 2 * kept_a, b_pos], dim=1)  # (B, N - r)
        target_slot = p + (num_a - r) + target_b  # (B, r) output slot of each target: after prefix and kept A
        # flat row numbers into (B * N, C) inputs and (B * (N - r), C) outputs: index_select on rows
        # is several times faster on CPU than gather with expanded indices
        sample = torch.cumsum(zero + 1, dim=0) - 1  # (B, 1): 0, 1, ..., B - 1
        in_rows = sample * num_tokens
        out_rows = sample * (num_tokens - r)
        keep_rows = (keep_pos + in_rows).flatten()  # (B * (N - r),)
        moving_rows = (moving_pos + in_rows).flatten()  # (B * r,)
        target_rows = (target_pos + in_rows).flatten()  # (B * r,)
        pair_rows = torch.cat([moving_rows, target_rows])  # (2 * B * r,): read both in one pass
        target_out_rows = (target_slot + out_rows).flatten()[:, None]  # (B * r, 1)

    def merge(x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        channels = x.shape[-1]
        if size is None:
            size = torch.ones_like(x[..., :1], dtype=torch.float32)  # (B, N, 1)
        rows, size_rows = x.reshape(-1, channels), size.reshape(-1, 1)  # (B * N, C), (B * N, 1)
        # The only full-size pass copies the kept tokens. The r merges then touch r rows each, with
        # new = old + sum_m (x_m - old) * size_m / size_new, which equals sum(size * x) / sum(size).
        # Sums over repeated targets (several A tokens into one B) use scatter_add, whose ONNX form
        # (ScatterElements, reduction "add") adds repeated indices as PyTorch does; index_add's does not.
        merged = rows.index_select(0, keep_rows)  # (B * (N - r), C)
        moving_size = size_rows.index_select(0, moving_rows)  # (B * r, 1)
        new_size = size_rows.index_select(0, keep_rows).scatter_add(0, target_out_rows, moving_size)
        share = moving_size / new_size.gather(0, target_out_rows)  # (B * r, 1)
        moving, target = rows.index_select(0, pair_rows).chunk(2)  # (B * r, C) each
        delta = (moving - target) * share  # (B * r, C)
        merged.scatter_add_(0, target_out_rows.expand(-1, channels), delta.to(merged.dtype))
        return merged.view(-1, num_tokens - r, channels), new_size.view(-1, num_tokens - r, 1)

    return merge


def proportional_attention_bias(size: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Additive attention bias ``log(size)`` for every key, shaped to broadcast over heads and queries.

    Args:
        size: (B, N, 1) token sizes.
        dtype: dtype of the attention logits (the query's dtype; e.g. bf16 under autocast).

    Returns:
        (B, 1, 1, N) bias for ``softmax(q k^T * scale + bias)`` (the ``attn_mask`` of
        ``torch.nn.functional.scaled_dot_product_attention``).
    """
    bias = size.log().transpose(1, 2)[:, None]  # (B, N, 1) -> (B, 1, N) -> (B, 1, 1, N)
    return bias.to(dtype) if dtype is not None else bias
