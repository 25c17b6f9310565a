"""Explanation maps: rollout, TokenLearner maps, pruning masks, ToMe sources, Grad-CAM, deletion curves."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import histotoken  # noqa: F401  (registers our model families)
from histotoken.explain import faithfulness
from histotoken.explain.gradcam import gradcam_maps
from histotoken.explain.maps import normalise_maps
from histotoken.explain.rollout import recorded_attention, rollout, rollout_maps
from histotoken.explain.token_maps import pruning_maps, tokenlearner_maps
from histotoken.explain.tome_sources import merge_sources
from histotoken.models.token_merging import apply_token_merging

IMG = 32
GRID = (4, 4)  # 32 px images, 8 px patches


def tiny_vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    options = dict(img_size=IMG, patch_size=8, depth=3, num_classes=3)
    options.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", **options).eval()


def images(count: int = 2) -> torch.Tensor:
    return torch.randn(count, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def assert_valid_maps(maps: torch.Tensor, count: int, grid: tuple[int, int] = GRID) -> None:
    assert maps.shape == (count, *grid)
    assert torch.isfinite(maps).all() and (maps >= 0).all()
    assert torch.allclose(maps.flatten(1).sum(dim=1), torch.ones(count), atol=1e-5)


def test_rollout_of_identity_attention_is_uniform():
    tokens = 1 + 16
    identity = torch.eye(tokens).expand(2, 3, tokens, tokens)  # (B, heads, N, N)
    flow = rollout([identity, identity])
    assert_valid_maps(normalise_maps(flow.reshape(2, *GRID)), 2)
    assert torch.allclose(normalise_maps(flow.reshape(2, *GRID)), torch.full((2, *GRID), 1 / 16))


def test_rollout_of_a_vit_that_attends_uniformly_is_uniform():
    model = tiny_vit()
    for block in model.blocks:  # q = k = 0: every token attends equally to every token
        nn.init.zeros_(block.attn.qkv.weight)
        nn.init.zeros_(block.attn.qkv.bias)
    maps = rollout_maps(model, images(), GRID)
    assert torch.allclose(maps, torch.full((2, *GRID), 1 / 16), atol=1e-6)


def test_rollout_hand_worked_two_tokens():
    # one class token and one patch; block 1 moves half the class token's attention to the patch
    first = torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]]])
    second = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    # with the residual: A1' = [[0.75, 0.25], [0, 1]], A2' = I; class row of A2' A1' = [0.75, 0.25]
    assert rollout([first, second])[0].tolist() == pytest.approx([0.25])
    assert rollout([first, second], num_prefix_tokens=0)[0].tolist() == pytest.approx([0.75, 0.25])


def test_recorded_attention_rows_sum_to_one_and_model_output_is_unchanged():
    model = tiny_vit()
    fused = [block.attn.fused_attn for block in model.blocks]
    x = images()
    with torch.no_grad():
        before = model(x)
        with recorded_attention(list(model.blocks)) as attentions:
            during = model(x)
        after = model(x)
    assert len(attentions) == 3 and attentions[0].shape == (2, 3, 17, 17)
    assert torch.allclose(attentions[0].sum(dim=-1), torch.ones(2, 3, 17), atol=1e-5)
    assert torch.allclose(before, during, atol=1e-5) and torch.equal(before, after)
    assert [block.attn.fused_attn for block in model.blocks] == fused  # restored


@pytest.mark.parametrize("name", ["tokenlearner_vit_tiny", "tokenmixer_tiny"])
def test_tokenlearner_maps_sum_to_one_over_positions(name):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=IMG, patch_size=8, num_classes=3, num_tokens=4).eval()
    maps = tokenlearner_maps(model, images())
    assert maps.shape == (2, 4, *GRID)  # (B, S, gh, gw)
    assert torch.allclose(maps.flatten(2).sum(dim=-1), torch.ones(2, 4), atol=1e-5)
    assert not torch.allclose(maps, torch.full_like(maps, 1 / 16))  # the maps differ from uniform


def test_tokenlearner_vit_rollout_up_to_the_learner_has_the_grid_shape():
    torch.manual_seed(0)
    model = timm.create_model("tokenlearner_vit_tiny", img_size=IMG, patch_size=8, num_classes=3).eval()
    maps = rollout_maps(model, images(), GRID, list(model.blocks)[: model.learner_after])
    assert_valid_maps(maps, 2)
    with pytest.raises(ValueError, match="patch grid"):
        rollout_maps(model, images(), GRID)  # blocks after the learner see S tokens, not the grid


def test_kept_patch_mask_has_exactly_k_patches():
    torch.manual_seed(0)
    model = timm.create_model("cnnprune_vit_tiny", img_size=IMG, patch_size=8, num_classes=3, keep_ratio=0.25).eval()
    importance, kept = pruning_maps(model, images(3))
    assert_valid_maps(importance, 3)
    assert kept.shape == (3, *GRID) and kept.dtype == torch.bool
    assert kept.flatten(1).sum(dim=1).tolist() == [4, 4, 4]  # k = round(0.25 * 16)
    # the kept patches are the top-k of the importance map
    top = importance.flatten(1).topk(4, dim=1).indices
    assert torch.equal(kept.flatten(1).gather(1, top), torch.ones(3, 4, dtype=torch.bool))


def test_merge_sources_partition_the_patches():
    model = apply_token_merging(tiny_vit(img_size=64, depth=4), r=6)  # 64 patches, 6 merged per block
    x = torch.randn(2, 3, 64, 64)
    sources = merge_sources(model, x)
    with torch.no_grad():
        tokens_out = model.forward_features(x).shape[1]
    assert sources.shape[0] == 2 and sources.shape[2] == 64
    assert sources.shape[1] == tokens_out < 65  # one row per token leaving the last block
    assert not sources[:, 0].any()  # the class token holds no patch
    assert torch.equal(sources.sum(dim=1), torch.ones(2, 64, dtype=torch.long))  # each patch in one token
    assert sources[:, 1:].any(dim=2).all()  # every other token holds at least one patch
    assert sources.sum(dim=2).max() > 1  # and some hold several


def test_rollout_through_merges_equals_plain_rollout_without_merging():
    from histotoken.explain.tome_sources import merged_rollout_maps

    model, x = tiny_vit(), images()
    assert torch.allclose(merged_rollout_maps(model, x, GRID), rollout_maps(model, x, GRID), atol=1e-5)
    merged = merged_rollout_maps(apply_token_merging(model, 3), x, GRID)
    assert_valid_maps(merged, 2)


def test_source_tracing_is_a_flag_and_leaves_the_module_functions_untouched():
    import histotoken.layers.token_merging as layers_module
    import histotoken.models.token_merging as merging_module

    functions = {name: value for name, value in vars(merging_module).items() if callable(value)}
    model = apply_token_merging(tiny_vit(depth=2), 3)
    seen = []
    model.blocks[0].register_forward_hook(
        lambda *_: seen.append((merging_module.bipartite_soft_matching, model._token_merging.trace_sources))
    )
    merge_sources(model, images())
    assert seen == [(layers_module.bipartite_soft_matching, True)]  # traced by the flag, not a replaced function
    assert {name: value for name, value in vars(merging_module).items() if callable(value)} == functions
    assert model._token_merging.trace_sources is False  # off again after the pass


def test_traced_sources_of_hand_built_merges():
    from histotoken.models.token_merging import _MergeState

    # class token + 4 patch tokens; A = positions 2, 4 and B = positions 1, 3 (patch p is position p + 1).
    # Merge 1 (r = 1, on the tokens): token 2 ~ token 1 (cosine 0.995) beats token 4 ~ token 3 (0.98),
    # so 2 joins 1 -> [cls, t4, t1+t2, t3]. Merge 2: A = {t1+t2}, B = {t4, t3}; t1+t2 = (1, 0.05) is
    # closer to t4 = (0.2, 1) (0.245) than to t3 = (0, 1) (0.05) -> [cls, t4+t1+t2, t3].
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.2, 1.0]]])
    state = _MergeState(nn.Module(), [1, 1], "tokens", proportional_attention=False, in_training=False)
    state.trace_sources = True
    state.start()
    x = state.merge(x, 0)
    first = state.traced_sources()
    x = state.merge(x, 1)
    expected_first = [[0, 0, 0, 0], [0, 0, 0, 1], [1, 1, 0, 0], [0, 0, 1, 0]]
    assert first[0].long().tolist() == expected_first
    assert state.traced_sources()[0].long().tolist() == [[0, 0, 0, 0], [1, 1, 0, 1], [0, 0, 1, 0]]
    assert x.shape == (1, 3, 2)


def test_merge_sources_without_merging_are_the_identity():
    sources = merge_sources(tiny_vit(), images())
    assert torch.equal(sources[:, 1:], torch.eye(16, dtype=torch.bool).expand(2, 16, 16))


@pytest.mark.parametrize("name, grid", [("resnet18", (8, 8)), ("mixer_tiny", GRID), ("convmixer_tiny", (8, 8))])
def test_gradcam_maps_have_the_grid_shape_and_are_normalised(name, grid):
    torch.manual_seed(0)
    kwargs = {"patch_size": 8, "img_size": IMG} if name == "mixer_tiny" else {}
    model = timm.create_model(name, num_classes=3, **kwargs).eval()
    assert_valid_maps(gradcam_maps(model, images(), torch.tensor([0, 2]), grid), 2, grid)


class OnePatchModel(nn.Module):
    """Class 1's logit is the mean of the top-left 8 x 8 patch: only that patch matters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = 10 * x[:, :, :8, :8].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(evidence), evidence], dim=1)


def test_deletion_curve_falls_first_for_the_right_patch_order():
    image = torch.zeros(3, IMG, IMG)
    image[:, :8, :8] = 1.0  # the evidence; the blur spreads it out, lowering the logit
    saliency = torch.zeros(GRID)
    saliency[0, 0] = 1.0
    orders = {"map": faithfulness.map_order(saliency), "reversed": faithfulness.map_order(-saliency)}
    curves = faithfulness.perturbation_curves(OnePatchModel(), image, orders, GRID, target=1, steps=16)
    assert curves["map"].deletion[1] < curves["map"].deletion[0]  # the first step removes the evidence
    assert curves["reversed"].deletion[1] == pytest.approx(curves["reversed"].deletion[0])
    assert faithfulness.auc(curves["map"].deletion) < faithfulness.auc(curves["reversed"].deletion)
    assert faithfulness.auc(curves["map"].insertion) > faithfulness.auc(curves["reversed"].insertion)


def test_masks_cover_a_growing_share_of_patches_in_the_given_order():
    order = torch.tensor([3, 0, 2, 1])
    masks = faithfulness.order_to_masks(order, (2, 2), (4, 4), steps=4)
    assert masks.shape == (5, 4, 4)
    assert masks.mean(dim=(1, 2)).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert masks[1, 2:, 2:].eq(1).all() and masks[1].sum() == 4  # patch 3 (bottom right) goes first
    assert faithfulness.auc([1.0, 1.0, 1.0]) == pytest.approx(1.0)


def test_gradcam_layer_of_a_cnn_keeps_a_spatial_map_on_small_images():
    from histotoken.explain.gradcam import target_layer

    model = timm.create_model("resnet18", num_classes=3)
    assert target_layer(model, 224)[0] is model.layer4  # 7 x 7 at 224 px
    assert target_layer(model, 32)[0] is model.layer2  # layer4 would be 1 x 1 at 32 px: a constant map
