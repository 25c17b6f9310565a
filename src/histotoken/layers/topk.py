"""Top-k token selection from per-token scores, hard at inference, differentiable in training.

Gradient path (training): the forward pass keeps the hard top-k tokens unchanged, and the kept
tokens are multiplied by a straight-through gate ``1 + (p - stop_gradient(p))`` whose value is
exactly 1 but whose gradient is that of the keep probability ``p = sigmoid(score)``: a kept
token's score gets ``p (1 - p) <dL/dx, x>``, so it rises when the loss would fall with more of
that token, the straight-through estimator of Bengio, Leonard and Courville, "Estimating or Propagating
Gradients Through Stochastic Neurons" (2013), as used for token pruning in e.g. DynamicViT
(Rao et al., NeurIPS 2021).

Exploration (training, ``gumbel=True``): the top-k is taken over ``score + Gumbel noise``, which
samples k tokens without replacement from ``softmax(score)`` (the Gumbel-top-k trick, Kool, van
Hoof and Welling, ICML 2019), so tokens that the scorer ranks low still get chosen now and then
and receive gradient. At inference the top-k is deterministic.

Positions: callers add position embeddings to the tokens *before* selection, so every kept token
carries its own position. Kept tokens are returned in their original (raster) order.
"""

import torch
from timm.layers import register_notrace_function


def gumbel_noise_like(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel(0, 1) noise of the scores' shape: ``-log(-log(U))``, U ~ Uniform(0, 1)."""
    uniform = torch.rand(scores.shape, device=scores.device, dtype=torch.float32, generator=generator)
    tiny = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny, spelt out for TorchScript
    exponential = -torch.log(uniform.clamp_min(tiny))  # Exp(1) sample, > 0
    return -torch.log(exponential.clamp_min(tiny))


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) scores -> (B, k) indices of the k highest scores, sorted ascending (raster order)."""
    return scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(B, N, C) tokens, (B, K) indices -> (B, K, C) the indexed tokens."""
    return tokens.gather(1, indices[..., None].expand(-1, -1, tokens.shape[-1]))


@register_notrace_function  # shape checks and a data-dependent top-k: one opaque call in an FX graph
def select_topk_tokens(
    tokens: torch.Tensor,
    scores: torch.Tensor,
    k: int,
    training: bool,
    gumbel: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the ``k`` tokens with the highest scores.

    Args:
        tokens: (B, N, C) tokens, position embeddings already added.
        scores: (B, N) importance logits (higher = keep).
        k: tokens to keep, ``1 <= k <= N``.
        training: differentiable selection (straight-through gate, optional Gumbel exploration);
            ``False`` gives the plain hard top-k and no gradient to the scores.
        gumbel: in training, choose the top-k of ``scores + Gumbel noise`` (exploration).
        generator: random generator for the noise (reproducible tests).

    Returns:
        selected: (B, K, C) kept tokens (values equal to ``tokens`` at ``indices``),
        indices: (B, K) long, positions of the kept tokens in ``tokens``, ascending,
        keep_prob: (B, N) ``sigmoid(scores)``, the soft keep probabilities (for a budget penalty).
    """
    num_tokens = tokens.shape[1]
    if not 1 <= k <= num_tokens:
        raise ValueError(f"k={k} tokens to keep must be between 1 and the number of tokens {num_tokens}")
    if scores.shape[0] != tokens.shape[0] or scores.shape[1] != tokens.shape[1]:
        raise ValueError(f"scores {list(scores.shape)} must be (B, N) = {list(tokens.shape[:2])}")
    keep_prob = scores.float().sigmoid()  # (B, N)
    with torch.no_grad():
        ranking = scores.float()
        if training and gumbel:
            ranking = ranking + gumbel_noise_like(ranking, generator)
        indices = topk_indices(ranking, k)  # (B, K)
    selected = gather_tokens(tokens, indices)  # (B, N, C) -> (B, K, C)
    if training:
        kept_prob = keep_prob.gather(1, indices)[..., None]  # (B, K, 1)
        gate = 1.0 + (kept_prob - kept_prob.detach())  # exactly 1 forward, gradient d(keep_prob)
        selected = selected * gate.to(selected.dtype)
    return selected, indices, keep_prob
