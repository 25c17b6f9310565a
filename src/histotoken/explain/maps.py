"""Shared conventions for explanation maps.

A *map* is a tensor (B, gh, gw) over a grid of image patches (the model's patch grid for token
models, a fixed grid for CNNs), non-negative, finite, and normalised to sum to 1 over the grid,
so that maps of different methods compare and a uniform map is ``1 / (gh * gw)`` everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CNN_GRID = (8, 8)  # patch grid for models without one (CNNs): Grad-CAM is pooled onto it


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """(B, gh, gw) scores -> non-negative maps summing to 1; an all-zero or non-finite map becomes uniform."""
    maps = torch.nan_to_num(maps.detach().float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    total = maps.flatten(1).sum(dim=1)  # (B,)
    uniform = torch.full_like(maps, 1.0 / maps[0].numel())
    safe = total.clamp_min(1e-12)[:, None, None]
    return torch.where((total > 0)[:, None, None], maps / safe, uniform)


def pool_to_grid(maps: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) pixel maps -> (B, gh, gw) by area averaging (bilinear when the grid is finer)."""
    maps = maps.float()[:, None]  # (B, 1, H, W)
    if maps.shape[-2] >= grid_size[0] and maps.shape[-1] >= grid_size[1]:
        pooled = F.adaptive_avg_pool2d(maps, grid_size)
    else:
        pooled = F.interpolate(maps, size=grid_size, mode="bilinear", align_corners=False)
    return pooled[:, 0]


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, gh, gw) -> (B, H, W) for overlays (nearest neighbour: one colour per patch)."""
    return F.interpolate(maps.float()[:, None], size=size, mode="nearest")[:, 0]


def model_grid(model: torch.nn.Module) -> tuple[int, int] | None:
    """The model's patch grid (gh, gw), or None when it has none (CNNs)."""
    for owner in (getattr(model, "patch_embed", None), getattr(model, "stem", None)):
        grid = getattr(owner, "grid_size", None)
        if grid is not None:
            return int(grid[0]), int(grid[1])
    return None
