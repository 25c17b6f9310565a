"""Which explanation each model family gets, and that every explanation figure draws."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import histotoken  # noqa: F401  (registers our model families)
from histotoken.explain import figures
from histotoken.explain.run import compute_maps, methods_for, select_images
from histotoken.models.token_merging import apply_token_merging
from histotoken.reporting.plots import figure_to_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = dict(img_size=32, num_classes=3)


@pytest.mark.parametrize("name, kwargs, auto, all_methods", [
    ("vit_tiny_patch16_224", dict(patch_size=8, depth=2), ["rollout"], ["rollout", "gradcam"]),
    ("tokenlearner_vit_tiny", dict(patch_size=8), ["tokenlearner", "rollout"], ["tokenlearner", "rollout"]),
    ("tokenmixer_tiny", dict(patch_size=8), ["tokenlearner"], ["tokenlearner"]),
    ("cnnprune_vit_tiny", dict(patch_size=8), ["scorer"], ["scorer"]),
    ("mixer_tiny", dict(patch_size=8), ["gradcam"], ["gradcam"]),
])
def test_each_family_gets_its_own_explanation(name, kwargs, auto, all_methods):
    model = timm.create_model(name, **TINY, **kwargs).eval()
    assert methods_for(model, "auto") == auto
    assert methods_for(model, "all") == all_methods


def test_method_that_does_not_fit_the_model_is_a_clear_error():
    with pytest.raises(ValueError, match="does not apply to ResNet"):
        methods_for(timm.create_model("resnet18", num_classes=3), "rollout")
    with pytest.raises(ValueError, match="unknown explanation method"):
        methods_for(timm.create_model("resnet18", num_classes=3), "lime")


def test_token_merging_model_shows_its_merged_tokens_and_rollout_through_the_merges():
    torch.manual_seed(0)
    model = apply_token_merging(timm.create_model("vit_tiny_patch16_224", patch_size=8, depth=2, **TINY), 3).eval()
    assert methods_for(model, "auto") == ["rollout"]
    maps, extras = compute_maps(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), ["rollout"], (4, 4))
    holders = extras["merge_holders"]
    assert holders.shape == (2, 4, 4) and len(torch.unique(holders[0])) == 16 - 2 * 3  # two blocks, r = 3
    assert maps["rollout"].shape == (2, 4, 4)
    assert torch.allclose(maps["rollout"].flatten(1).sum(dim=1), torch.ones(2), atol=1e-5)


def test_selection_takes_confident_correct_images_and_errors_in_turn():
    targets = np.array([0, 0, 1, 1, 1])
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3], [0.45, 0.55]])
    chosen, cells = select_images(targets, probabilities, n=3)
    assert cells[(0, "TP")] == [0, 1] and cells[(1, "TP")] == [2, 4]
    assert cells[(0, "FP")] == [3] and cells[(1, "FN")] == [3] and cells[(1, "FP")] == []
    assert chosen == [0, 2, 3]  # the most confident TP of each class, then the confident error


def test_every_explanation_figure_draws_to_png():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    maps = rng.random((3, 32, 32))
    drawn = [
        figures.per_image_figure(images, {"rollout": maps, "gradcam": maps}, ["true a\npred b (0.50)"] * 3),
        figures.outcome_grid_figure({("a", "TP"): (images[0], maps[0], "a 0.90"), ("b", "FN"): None},
                                    ["a", "b"], ["TP", "FP", "FN"], "rollout"),
        figures.token_maps_figure(images, rng.random((3, 4, 32, 32)), "tokens"),
        figures.kept_patches_figure(images, maps, rng.random((3, 4, 4)) > 0.5),
        figures.merge_sources_figure(images, rng.integers(-1, 5, (3, 32, 32))),
        figures.tsne_figure(rng.random((6, 2)), list("aabbcc"), ["100", "400"] * 3, "t-SNE"),
        figures.faithfulness_figure({"gradcam": {"deletion": np.linspace(1, 0, 5), "insertion": np.linspace(0, 1, 5)},
                                     "random": {"deletion": np.ones(5) / 2, "insertion": np.ones(5) / 2}}, "random"),
    ]
    for figure in drawn:
        assert figure_to_png(figure)[:8] == PNG_SIGNATURE
