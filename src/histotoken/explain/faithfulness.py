"""Deletion and insertion curves: does removing what a map calls important hurt the prediction?

Petsiuk, Das and Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box Models",
BMVC 2018 (https://arxiv.org/abs/1806.07421), section 4.1. For one image and one map over a grid of
patches:

- deletion: starting from the image, replace patches with a blurred copy of the image, most
  important first, and follow the probability of the class the model predicted on the intact
  image; a faithful map makes it fall fast (low area under the curve);
- insertion: starting from the blurred image, reveal patches in the same order; a faithful map
  makes the probability rise fast (high area).

The same curves for random patch orders are the reference a map must beat. All steps of one
image (every method's orders and the random ones) run as one batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn
from torchvision.transforms.v2.functional import gaussian_blur

DEFAULT_STEPS = 12
DEFAULT_RANDOM_ORDERS = 3


def blurred(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> a strongly blurred copy (kernel about a quarter of the image side)."""
    side = min(images.shape[-2:])
    kernel = 2 * max(1, side // 8) + 1
    return gaussian_blur(images, [kernel, kernel], [side / 8.0, side / 8.0])


def order_to_masks(order: torch.Tensor, grid_size: tuple[int, int], image_size: tuple[int, int],
                   steps: int) -> torch.Tensor:
    """Patch order (N,) -> (steps + 1, H, W) masks; mask k covers the first round(k N / steps) patches."""
    num_patches = order.numel()
    counts = torch.round(torch.linspace(0, num_patches, steps + 1)).long()
    rank = torch.empty(num_patches, dtype=torch.long)
    rank[order] = torch.arange(num_patches)  # rank[p]: when patch p is reached
    grid_masks = rank[None, :] < counts[:, None]  # (steps + 1, N)
    grid_masks = grid_masks.reshape(steps + 1, 1, *grid_size).float()
    return torch.nn.functional.interpolate(grid_masks, size=image_size, mode="nearest")[:, 0]


def auc(curve: np.ndarray) -> float:
    """Area under a curve sampled at evenly spaced fractions 0..1 (trapezoidal rule)."""
    curve = np.asarray(curve, dtype=float)
    return float(np.trapezoid(curve, dx=1.0 / (len(curve) - 1)))


@dataclasses.dataclass
class Curves:
    """Probability of the predicted class after each step (steps + 1 values, step 0 first)."""

    deletion: np.ndarray
    insertion: np.ndarray


def perturbation_curves(
    model: nn.Module,
    image: torch.Tensor,
    orders: dict[str, torch.Tensor],
    grid_size: tuple[int, int],
    target: int,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 256,
) -> dict[str, Curves]:
    """Deletion and insertion curves of one normalised image (3, H, W) for every patch order in ``orders``."""
    size = tuple(image.shape[-2:])
    background = blurred(image[None])[0]
    batches = []
    for order in orders.values():
        masks = order_to_masks(order, grid_size, size, steps)[:, None]  # (K + 1, 1, H, W)
        batches.append(image * (1 - masks) + background * masks)  # deletion: masked patches blurred
        batches.append(background * (1 - masks) + image * masks)  # insertion: masked patches revealed
    inputs = torch.cat(batches)  # (2 * len(orders) * (K + 1), 3, H, W)
    with torch.no_grad():
        probabilities = torch.cat([
            model(chunk).float().softmax(dim=1)[:, target] for chunk in inputs.split(batch_size)
        ]).numpy()
    curves = probabilities.reshape(len(orders), 2, steps + 1)
    return {name: Curves(curves[i, 0], curves[i, 1]) for i, name in enumerate(orders)}


def map_order(saliency: torch.Tensor) -> torch.Tensor:
    """(gh, gw) map -> patch indices, most important first (ties broken by position, stably)."""
    return torch.argsort(saliency.flatten(), descending=True, stable=True)


def random_orders(num_patches: int, count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(num_patches, generator=generator) for _ in range(count)]
