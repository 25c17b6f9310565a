"""The explanations token-efficient models carry themselves, recorded with ``record_tokens`` (``token_info``).

- TokenLearner-ViT and TokenMixer: the S spatial maps with which the TokenLearner pooled the patch
  grid into S tokens (``token_info["attention_maps"]``, (B, S, gh, gw)); with the softmax learner each
  map sums to 1 over the positions. Their mean is the model's one-map summary.
- CNN-pruned ViT: the scorer's importance logits per patch (``token_info["scores"]``) and the patches
  the ViT kept (``token_info["kept_indices"]``); the map is ``softmax(scores)``, the weights with which
  the scorer pooled its own features.
"""

from __future__ import annotations

import torch
from torch import nn

from histotoken.explain.maps import normalise_maps
from histotoken.models.records import record_tokens


def _forward_info(model: nn.Module, images: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
    with torch.no_grad(), record_tokens(model) as record:
        model(images)
    info = record.token_info
    if key not in info:
        raise ValueError(f"{type(model).__name__} recorded no {key!r} in token_info; it has no token maps")
    return info


def tokenlearner_maps(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, S, gh, gw): the TokenLearner's pooling weights over the patch grid, as used."""
    return _forward_info(model, images, "attention_maps")["attention_maps"].float()


def tokenlearner_summary(maps: torch.Tensor) -> torch.Tensor:
    """(B, S, gh, gw) -> (B, gh, gw): the mean of the S maps, normalised."""
    return normalise_maps(maps.mean(dim=1))


def pruning_maps(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CNN-pruned ViT: (importance map (B, gh, gw) = softmax of the scores, kept-patch mask (B, gh, gw) bool)."""
    info = _forward_info(model, images, "kept_indices")
    grid = tuple(model.patch_embed.grid_size)
    scores = info["scores"].float()  # (B, N)
    importance = scores.softmax(dim=1).reshape(-1, *grid)
    kept = torch.zeros_like(scores, dtype=torch.bool)
    kept.scatter_(1, info["kept_indices"].long(), True)  # (B, N): True where the ViT read the patch
    return normalise_maps(importance), kept.reshape(-1, *grid)
