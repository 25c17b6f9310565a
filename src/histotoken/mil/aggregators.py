"""Slide classifiers over tile tokens (multiple-instance learning): one ``nn.Module`` per aggregator.

Every aggregator takes one bag of tile features, ``(N, D)`` or ``(1, N, D)``, and returns a
:class:`BagOutput`: slide logits ``(1, C)``, an importance per tile ``(N,)`` for heatmaps, the
number of tokens in and the number of tokens the classifier head finally saw.

Baselines:

- ``mean``: a linear layer on the mean of the tiles (= the mean of per-tile logits).
- ``max``: per-tile logits, maximum over tiles per class (instance-level max pooling).
- ``abmil``: gated attention pooling, Ilse, Tomczak, Welling, "Attention-based Deep Multiple
  Instance Learning", ICML 2018: ``a = softmax_n(w^T (tanh(V h_n) * sigmoid(U h_n)))``,
  ``z = sum_n a_n h_n``.
- ``clam_sb``: CLAM single-branch, Lu et al., "Data-efficient and weakly supervised computational
  pathology on whole-slide images", Nat. Biomed. Eng. 2021: the same gated attention, plus the
  optional instance clustering loss (the ``k`` most and least attended tiles get pseudo-labels
  "in class" / "not in class" for the slide's class; cross-entropy instead of CLAM's smooth SVM).
- ``transmil``: Shao et al., "TransMIL: Transformer based Correlated Multiple Instance Learning",
  NeurIPS 2021: class token, two transformer layers with the PPEG (depth-wise 7/5/3 convolutions
  on the tiles laid out on a square) between them. **Simplified**: exact softmax attention in
  place of the paper's Nystrom approximation of it, so memory grows as N^2 and bags are
  subsampled to ``max_tokens`` tiles.

Token-efficient (they reuse ``histotoken.layers``, they do not copy it):

- ``tokenlearner``: ``layers.tokenlearner.TokenLearner`` pools the N tiles into S learned slots,
  then a small transformer over the class token and the slots (tokens kept: S).
- ``token_merging``: a transformer over the tiles that merges ``r`` tokens per block with
  ``layers.token_merging.bipartite_soft_matching`` (keys as the metric, proportional attention).
- ``topk``: a learned scorer keeps the ``k`` best tiles (``layers.topk.select_topk_tokens``,
  straight-through gradient to the scorer), then a small transformer over them.

Chunks: ``mean``, ``max``, ``abmil`` and ``clam_sb`` also take a bag as an iterable of chunks
(:meth:`forward_chunks`, attention pooling by an online softmax), so a 100,000-tile slide never
has to be in memory at once (``streams = True``). The others read at most ``max_tokens`` tiles
(a random subset in training, evenly spaced at evaluation; see :func:`subsample_indices`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch
from torch import nn

from histotoken.layers.token_merging import bipartite_soft_matching, proportional_attention_bias
from histotoken.layers.tokenlearner import TokenLearner
from histotoken.layers.topk import select_topk_tokens


@dataclasses.dataclass
class BagOutput:
    """What an aggregator returns for one bag."""

    logits: torch.Tensor  # (1, C)
    importance: torch.Tensor  # (N,) one value per input tile (attention, keep probability, tile margin)
    tokens_in: int
    tokens_kept: int
    aux_loss: torch.Tensor | None = None  # e.g. CLAM's instance clustering loss, when a label was given
    tokens_per_block: list[int] = dataclasses.field(default_factory=list)  # transformer aggregators


def as_bag(x: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` or ``(1, N, D)`` -> ``(1, N, D)``; one bag at a time (bags differ in N)."""
    if x.dim() == 2:
        x = x[None]
    if x.dim() != 3 or x.shape[0] != 1:
        raise ValueError(f"a bag is (N, D) or (1, N, D) tile features, got shape {list(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError("a bag needs at least one tile")
    return x


def subsample_indices(num_tiles: int, max_tokens: int | None, training: bool,
                      generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Sorted indices of at most ``max_tokens`` tiles (random in training, evenly spaced otherwise),
    or ``None`` when every tile fits."""
    if max_tokens is None or num_tiles <= max_tokens:
        return None
    if training:
        return torch.randperm(num_tiles, generator=generator)[:max_tokens].sort().values
    return torch.linspace(0, num_tiles - 1, max_tokens).round().long().unique()


def tile_margin(instance_logits: torch.Tensor) -> torch.Tensor:
    """(N, C) per-tile logits -> (N,) evidence for the last class over the others (logit 1 - logit 0 for C = 2)."""
    if instance_logits.shape[-1] == 1:
        return instance_logits[..., 0]
    others = instance_logits[..., :-1].logsumexp(-1)
    return instance_logits[..., -1] - others


class MILAggregator(nn.Module):
    """Base class: ``forward(bag, label=None) -> BagOutput``; ``streams``: whether chunks are accepted."""

    streams = False
    max_tokens: int | None = None

    def forward_chunks(self, chunks: Iterable[torch.Tensor]) -> BagOutput:
        raise NotImplementedError(f"{type(self).__name__} does not take a bag in chunks; load at most max_tokens tiles")


# --------------------------------------------------------------------------- baselines


class MeanPoolMIL(MILAggregator):
    """Linear classifier on the mean tile feature; importance = each tile's own margin."""

    streams = True

    def __init__(self, in_dim: int, num_classes: int = 2) -> None:
        super().__init__()
        self.head = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor, label: int | None = None) -> BagOutput:
        x = as_bag(x)
        logits = self.head(x.mean(1))  # (1, N, D) -> (1, D) -> (1, C)
        importance = tile_margin(self.head(x[0]))  # (N, C) -> (N,)
        return BagOutput(logits, importance, x.shape[1], x.shape[1])

    def forward_chunks(self, chunks: Iterable[torch.Tensor]) -> BagOutput:
        total, count, margins = None, 0, []
        for chunk in chunks:
            chunk = as_bag(chunk)[0]  # (n, D)
            total = chunk.sum(0) if total is None else total + chunk.sum(0)
            count += chunk.shape[0]
            margins.append(tile_margin(self.head(chunk)))
        if total is None:
            raise ValueError("a bag needs at least one tile")
        logits = self.head((total / count)[None])  # (1, C)
        return BagOutput(logits, torch.cat(margins), count, count)


class MaxPoolMIL(MILAggregator):
    """Per-tile logits, the maximum over tiles for each class (instance-level max pooling)."""

    streams = True

    def __init__(self, in_dim: int, num_classes: int = 2) -> None:
        super().__init__()
        self.head = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor, label: int | None = None) -> BagOutput:
        x = as_bag(x)
        instance_logits = self.head(x[0])  # (N, C)
        return BagOutput(instance_logits.max(0).values[None], tile_margin(instance_logits), x.shape[1], x.shape[1])

    def forward_chunks(self, chunks: Iterable[torch.Tensor]) -> BagOutput:
        best, margins, count = None, [], 0
        for chunk in chunks:
            instance_logits = self.head(as_bag(chunk)[0])  # (n, C)
            chunk_best = instance_logits.max(0).values
            best = chunk_best if best is None else torch.maximum(best, chunk_best)
            margins.append(tile_margin(instance_logits))
            count += instance_logits.shape[0]
        if best is None:
            raise ValueError("a bag needs at least one tile")
        return BagOutput(best[None], torch.cat(margins), count, count)


class GatedAttention(nn.Module):
    """Ilse et al. (2018) gated attention logits: ``w^T (tanh(V h) * sigmoid(U h))``, (..., L) -> (...,)."""

    def __init__(self, dim: int, attention_dim: int = 128) -> None:
        super().__init__()
        self.V = nn.Linear(dim, attention_dim)
        self.U = nn.Linear(dim, attention_dim)
        self.w = nn.Linear(attention_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h)))[..., 0]


class ABMIL(MILAggregator):
    """Embedding ``h = ReLU(W x)``, gated attention pooling, linear classifier on the pooled ``z``."""

    streams = True

    def __init__(self, in_dim: int, num_classes: int = 2, dim: int = 128, attention_dim: int = 64,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(dim, attention_dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor, label: int | None = None) -> BagOutput:
        h = self.embed(as_bag(x)[0])  # (N, D) -> (N, L)
        weights = self.attention(h).softmax(0)  # (N,), sums to 1
        pooled = weights @ h  # (N,) @ (N, L) -> (L,)
        return BagOutput(self.head(pooled[None]), weights, h.shape[0], h.shape[0])

    def forward_chunks(self, chunks: Iterable[torch.Tensor]) -> BagOutput:
        """Online softmax (running maximum, rescaled sums): the same pooling, one chunk in memory at a time."""
        running_max = torch.tensor(-math.inf)
        normaliser = torch.tensor(0.0)
        pooled = None
        scores = []
        for chunk in chunks:
            h = self.embed(as_bag(chunk)[0])  # (n, L)
            score = self.attention(h)  # (n,)
            new_max = torch.maximum(running_max, score.max())
            rescale = torch.exp(running_max - new_max)  # 0 at the first chunk (exp(-inf))
            exp_score = torch.exp(score - new_max)  # (n,)
            normaliser = normaliser * rescale + exp_score.sum()
            contribution = exp_score @ h  # (L,)
            pooled = contribution if pooled is None else pooled * rescale + contribution
            running_max = new_max
            scores.append(score)
        if pooled is None:
            raise ValueError("a bag needs at least one tile")
        weights = torch.exp(torch.cat(scores) - running_max) / normaliser  # (N,)
        return BagOutput(self.head((pooled / normaliser)[None]), weights, len(weights), len(weights))


class CLAMSB(ABMIL):
    """CLAM single-branch: ABMIL's gated attention plus the optional instance clustering loss.

    With ``label`` given in training mode (and ``instance_loss_weight > 0``), ``aux_loss`` is the
    cross-entropy of the slide class's instance classifier on the ``k`` most attended tiles
    (pseudo-label 1) and the ``k`` least attended (pseudo-label 0); the fit adds it with that weight.
    """

    def __init__(self, in_dim: int, num_classes: int = 2, dim: int = 128, attention_dim: int = 64,
                 dropout: float = 0.0, k_sample: int = 8, instance_loss_weight: float = 0.3) -> None:
        super().__init__(in_dim, num_classes, dim, attention_dim, dropout)
        self.k_sample = k_sample
        self.instance_loss_weight = instance_loss_weight
        self.instance_classifiers = nn.ModuleList(nn.Linear(dim, 2) for _ in range(num_classes))

    def forward(self, x: torch.Tensor, label: int | None = None) -> BagOutput:
        h = self.embed(as_bag(x)[0])  # (N, L)
        weights = self.attention(h).softmax(0)  # (N,)
        output = BagOutput(self.head((weights @ h)[None]), weights, h.shape[0], h.shape[0])
        k = min(self.k_sample, h.shape[0] // 2)
        if label is not None and self.training and self.instance_loss_weight > 0 and k > 0:
            order = weights.argsort(descending=True)
            chosen = torch.cat([order[:k], order[-k:]])  # most and least attended tiles
            targets = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)])
            logits = self.instance_classifiers[int(label)](h[chosen])  # (2k, 2)
            output.aux_loss = nn.functional.cross_entropy(logits, targets)
        return output


# --------------------------------------------------------------------------- transformer parts


class TokenBlock(nn.Module):
    """Pre-norm transformer block with explicit attention: returns the class token's attention, and can
    merge ``merge_r`` tokens (ToMe: between attention and MLP, keys as the metric, sizes -> proportional attention)."""

    def __init__(self, dim: int, num_heads: int = 4, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None,
                merge_r: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        batch, num_tokens, channels = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(batch, num_tokens, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, N, 3, H, c) -> 3 x (B, H, N, c)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, N, N)
        if size is not None:
            logits = logits + proportional_attention_bias(size, logits.dtype)
        attention = logits.softmax(-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(batch, num_tokens, channels))
        cls_attention = attention[:, :, 0, :].mean(1)  # (B, N): what the class token attends to, mean over heads
        if merge_r > 0:
            merge = bipartite_soft_matching(k.mean(1), merge_r, num_prefix_tokens=1)  # (B, N, c) metric
            x, size = merge(x, size)  # (B, N, C) -> (B, N - r, C)
        x = x + self.mlp(self.norm2(x))
        return x, size, cls_attention


class _ClassTokenTransformer(MILAggregator):
    """Shared parts: tile embedding, class token, blocks, norm and head on the class token."""

    def __init__(self, in_dim: int, num_classes: int, dim: int, depth: int, num_heads: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU())
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(TokenBlock(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def _subsample(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        indices = subsample_indices(x.shape[1], self.max_tokens, self.training)
        return (x, None) if indices is None else (x[:, indices], indices)

    @staticmethod
    def _scatter(values: torch.Tensor, indices: torch.Tensor | None, num_tiles: int) -> torch.Tensor:
        """Importance of the tiles used, NaN for the tiles left out by subsampling."""
        if indices is None:
            return values
        full = torch.full((num_tiles,), math.nan, dtype=values.dtype)
        full[indices] = values
        return full

    def _run_blocks(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        counts = []
        first_attention = None
        for block in self.blocks:
            tokens, _, attention = block(tokens)
            first_attention = attention if first_attention is None else first_attention
            counts.append(tokens.shape[1])
        return tokens, first_attention, counts


class TransMIL(_ClassTokenTransformer):
    """TransMIL with exact attention (see the module docstring): layer, PPEG, layer, head on the class token."""

    max_tokens = 2048

    def __init__(self, in_dim: int, num_classes: int = 2, dim: int = 64, num_heads: int = 4) -> None:
        super().__init__(in_dim, num_classes, dim, depth=2, num_heads=num_heads)
        self.ppeg = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, label: int | None = None) -> BagOutput:
        x = as_bag(x)
        num_tiles = x.shape[1]
        x, indices = self._subsample(x)
        h = self.embed(x)  # (1, n, L)
        n = h.shape[1]
        side = math.ceil(math.sqrt(n))
        h = torch.cat([h, h[:, : side * side - n]], dim=1)  # pad to a square by repeating the first tiles
        tokens = torch.cat([self.cls_token, h], dim=1)  # (1, 1 + side^2, L)
        tokens, _, _ = self.blocks[0](tokens)
        cls, grid = tokens[:, :1], tokens[:, 1:]
        grid = grid.transpose(1, 2).reshape(1, -1, side, side)  # (1, side^2, L) -> (1, L, side, side)
        grid = grid + sum(conv(grid) for conv in self.ppeg)  # PPEG: identity + depth-wise 7x7, 5x5, 3x3
        tokens = torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)
        tokens, _, attention = self.blocks[1](tokens)
        logits = self.head(self.norm(tokens[:, 0]))
        importance = self._scatter(attention[0, 1 : 1 + n], indices, num_tiles)  # class token -> original tiles
        return BagOutput(logits, importance, num_tiles, n, tokens_per_block=[tokens.shape[1]] * 2)


class TokenLearnerMIL(_ClassTokenTransformer):
    """TokenLearner slots over the tiles, then a transformer over [class token, slots]."""

    max_tokens = 16384

    def __init__(self, in_dim: int, num_classes: int = 2, dim: int = 64, num_slots: int = 8, depth: int = 1,
                 num_heads: int = 4) -> None:
        super().__init__(in_dim, num_classes, dim, depth, num_heads)
        self.learner = TokenLearner(dim, num_tokens=num_slots)

    def forward(self, x: torch.Tensor, label: int | None = None) -> BagOutput:
        x = as_bag(x)
        num_tiles = x.shape[1]
        x, indices = self._subsample(x)
        h = self.embed(x)  # (1, n, L)
        slots, weights = self.learner(h, grid_size=(1, h.shape[1]))  # (1, S, L), (1, S, n); tiles have no grid
        tokens, _, counts = self._run_blocks(torch.cat([self.cls_token, slots], dim=1))
        logits = self.head(self.norm(tokens[:, 0]))
        importance = self._scatter(weights[0].mean(0), indices, num_tiles)  # mean slot weight per tile
        return BagOutput(logits, importance, num_tiles, slots.shape[1], tokens_per_block=counts)


class TokenMergingMIL(_ClassTokenTransformer):
    """A transformer over [class token, tiles] that merges ``r`` tile tokens in every block (ToMe)."""

    max_tokens = 2048

    def __init__(self, in_dim: int, num_classes: int = 2, dim: int = 64, depth: int = 2, r: int = 8,
                 num_heads: int = 4) -> None:
        super().__init__(in_dim, num_classes, dim, depth, num_heads)
        self.r = r

    def forward(self, x: torch.Tensor, label: int | None = None) -> BagOutput:
        x = as_bag(x)
        num_tiles = x.shape[1]
        x, indices = self._subsample(x)
        tokens = torch.cat([self.cls_token, self.embed(x)], dim=1)  # (1, 1 + n, L)
        size, counts, first_attention = None, [], None
        for block in self.blocks:
            tokens, size, attention = block(tokens, size, merge_r=self.r)
            first_attention = attention if first_attention is None else first_attention
            counts.append(tokens.shape[1] - 1)  # tile tokens left after this block
        logits = self.head(self.norm(tokens[:, 0]))
        # importance: the first block's class-token attention, taken before any merge (one value per tile)
        importance = self._scatter(first_attention[0, 1:], indices, num_tiles)
        return BagOutput(logits, importance, num_tiles, tokens.shape[1] - 1, tokens_per_block=counts)


class TopKMIL(_ClassTokenTransformer):
    """A learned scorer keeps the ``k`` best tiles (straight-through top-k), a transformer reads them."""

    max_tokens = 16384

    def __init__(self, in_dim: int, num_classes: int = 2, dim: int = 64, k: int = 16, depth: int = 1,
                 num_heads: int = 4, gumbel: bool = True) -> None:
        super().__init__(in_dim, num_classes, dim, depth, num_heads)
        self.k = k
        self.gumbel = gumbel
        self.scorer = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor, label: int | None = None) -> BagOutput:
        x = as_bag(x)
        num_tiles = x.shape[1]
        x, indices = self._subsample(x)
        h = self.embed(x)  # (1, n, L)
        scores = self.scorer(h)[..., 0]  # (1, n)
        k = min(self.k, h.shape[1])
        kept, _, keep_prob = select_topk_tokens(h, scores, k, training=self.training, gumbel=self.gumbel)
        tokens, _, counts = self._run_blocks(torch.cat([self.cls_token, kept], dim=1))  # (1, 1 + k, L)
        logits = self.head(self.norm(tokens[:, 0]))
        importance = self._scatter(keep_prob[0].to(h.dtype), indices, num_tiles)
        return BagOutput(logits, importance, num_tiles, k, tokens_per_block=counts)


AGGREGATORS: dict[str, type[MILAggregator]] = {
    "mean": MeanPoolMIL,
    "max": MaxPoolMIL,
    "abmil": ABMIL,
    "clam_sb": CLAMSB,
    "transmil": TransMIL,
    "tokenlearner": TokenLearnerMIL,
    "token_merging": TokenMergingMIL,
    "topk": TopKMIL,
}


def create_aggregator(name: str, in_dim: int, num_classes: int = 2, **kwargs: object) -> MILAggregator:
    """Build a registered aggregator by name (``-`` and ``_`` both accepted); keyword arguments go to its class."""
    key = name.strip().lower().replace("-", "_")
    if key not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; choose one of {', '.join(AGGREGATORS)}")
    try:
        return AGGREGATORS[key](in_dim, num_classes, **kwargs)
    except TypeError as error:
        raise ValueError(f"aggregator {key}: {error}") from error
