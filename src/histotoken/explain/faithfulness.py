"""Deletion and insertion curves: does removing what a map calls important hurt the prediction?

Petsiuk, Das and Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box Models",
BMVC 2018 (https://arxiv.org/abs/1806.07421), section 4.1. For one image and one map over a grid of
patches:

- deletion: starting from the image, replace patches with a blurred copy of the image, most
  important first, and follow the probability of the class the model predicted on the intact
  image; a faithful map makes it fall fast (low area under the curve);
- insertion: starting from the blurred image, reveal patches in the same order; a faithful map
  makes the probability rise fast (high area).

The same curves for random patch orders are the reference a map must beat; a map is called better
than random only when the paired 95% interval over images of its AUC minus the random one excludes 0
(:func:`faithfulness_score`), and "not resolved" otherwise. All steps of one image (every method's
orders and the random ones) run as one batch.
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


def _judge(kind: str, difference, better_sign: int) -> tuple[str, str]:
    """('better'|'worse'|'not resolved', 'deletion -0.041 [-0.060, -0.022]') for map - random AUCs."""
    numbers = f"{kind} {difference.mean:+.3f} [{difference.low:+.3f}, {difference.high:+.3f}]"
    if not difference.resolved:
        return "not resolved", numbers
    return ("better" if np.sign(difference.mean) == better_sign else "worse"), numbers


def faithfulness_score(deletion: np.ndarray, random_deletion: np.ndarray, insertion: np.ndarray,
                       random_insertion: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> dict:
    """A map's deletion/insertion AUCs against random orders, with paired intervals over images and a verdict.

    Inputs are per-image AUCs (N,): the map's, and the mean over the random orders of that image. For
    each curve the difference map - random is averaged over images and gets a 95% bootstrap interval
    over images (:func:`histotoken.stats.paired_mean_difference`: one draw of images for both sides).
    The map is "better than random" on deletion only when that interval lies below 0 (the map's curve
    falls faster), on insertion only when it lies above 0; otherwise the comparison is "not resolved"
    with these images. The verdict text states the number of images and both intervals.
    """
    from histotoken.stats import paired_mean_difference

    deletion_difference = paired_mean_difference(deletion, random_deletion, n_resamples, seed)
    insertion_difference = paired_mean_difference(insertion, random_insertion, n_resamples, seed + 1)
    deletion_verdict, deletion_numbers = _judge("deletion", deletion_difference, better_sign=-1)
    insertion_verdict, insertion_numbers = _judge("insertion", insertion_difference, better_sign=1)
    better = [kind for kind, verdict in (("deletion", deletion_verdict), ("insertion", insertion_verdict))
              if verdict == "better"]
    worse = [kind for kind, verdict in (("deletion", deletion_verdict), ("insertion", insertion_verdict))
             if verdict == "worse"]
    if better:
        verdict = f"better than random on {' and '.join(better)}"
    elif worse:
        verdict = f"worse than random on {' and '.join(worse)}"
    else:
        verdict = "not resolved against random"
    verdict += (f" ({deletion_difference.n} images; map minus random AUC, 95% interval over images: "
                f"{deletion_numbers}, {insertion_numbers})")
    return {
        "deletion_auc": float(np.mean(deletion)), "insertion_auc": float(np.mean(insertion)),
        "random_deletion_auc": float(np.mean(random_deletion)),
        "random_insertion_auc": float(np.mean(random_insertion)),
        "deletion_difference": [deletion_difference.mean, deletion_difference.low, deletion_difference.high],
        "insertion_difference": [insertion_difference.mean, insertion_difference.low, insertion_difference.high],
        "n_images": deletion_difference.n,
        "better_than_random_deletion": deletion_verdict == "better",
        "better_than_random_insertion": insertion_verdict == "better",
        "no_better_than_random": not better,
        "verdict": verdict,
    }
