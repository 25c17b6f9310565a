"""What timm users expect of every family we register: features_only, gradient checkpointing,
layer-decay parameter groups and construction on the meta device.

Parametrized over timm's registry (the names whose entry point lives in ``histotoken``), like
``tests/test_model_contract.py``; 64 px images with patch 8 where the family has a patch size.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay
from torch import nn

import histotoken  # noqa: F401  (registers our families)

NAMES = sorted(
    name for name in timm.list_models()
    if getattr(timm.models.model_entrypoint(name), "__module__", "").startswith("histotoken.")
)
CHEAP_NAMES = [name for name in NAMES if "_small" not in name]
# TokenMixer's transformer blocks hold learned tokens without grid positions: no feature maps
# (declared by having no feature_info, as timm's models without feature maps do; see its docstring)
NO_FEATURE_MAPS = {"tokenmixer_small", "tokenmixer_tiny"}
IMG = 64


def create(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("cnnprune"):
        kwargs.setdefault("gumbel", False)  # no sampling: two passes select the same patches
    try:
        return timm.create_model(name, img_size=IMG, patch_size=8, num_classes=3, **kwargs)
    except TypeError as error:
        if "patch_size" not in str(error):
            raise
        return timm.create_model(name, img_size=IMG, num_classes=3, **kwargs)


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(set(NAMES) - NO_FEATURE_MAPS))
def test_features_only_returns_the_feature_maps_that_feature_info_describes(name):
    model = create(name, features_only=True).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) == 3  # timm's default for ViT-like families: the last three levels
    with torch.no_grad():
        maps = model(images())
    assert len(maps) == len(channels)
    for feature_map, width, reduction in zip(maps, channels, reductions):
        assert feature_map.shape == (2, width, IMG // reduction, IMG // reduction)
        assert torch.isfinite(feature_map).all()


def test_cnnprune_feature_maps_hold_the_kept_patches_and_zeros_elsewhere():
    model = create("cnnprune_vit_tiny", features_only=True, keep_ratio=0.25).eval()
    with torch.no_grad():
        maps = model(images())
    nonzero = maps[-1].abs().sum(dim=1).flatten(1).gt(0).sum(dim=1)  # (B,) patches with features
    assert nonzero.tolist() == [16, 16]  # k = 0.25 * 64 patches


def test_tokenlearner_first_feature_level_is_the_embedded_patch_grid():
    features = create("tokenlearner_vit_mini", out_indices=(0,), features_only=True, patch_size=4).eval()
    vit = features.model  # timm's FeatureGetterNet keeps the model it calls
    x = images()
    with torch.no_grad():
        (level0,) = features(x)
        embedded = vit.patch_embed(x) + vit.pos_embed[:, 1:]  # (B, N, C) patches with positions
    torch.testing.assert_close(level0, embedded.transpose(1, 2).reshape(2, -1, *vit.patch_embed.grid_size))


@pytest.mark.parametrize("name", sorted(NO_FEATURE_MAPS))
def test_a_family_without_feature_maps_refuses_features_only(name):
    assert not hasattr(create(name), "feature_info")
    with pytest.raises(ValueError, match="no feature maps"):
        create(name, features_only=True)


@pytest.mark.parametrize("name", CHEAP_NAMES)
def test_gradient_checkpointing_recomputes_the_blocks_and_gives_the_same_gradients(name):
    plain = create(name).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    calls = {"plain": 0, "checkpointed": 0}
    plain.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__("plain", calls["plain"] + 1))
    checkpointed.blocks[0].register_forward_pre_hook(
        lambda *_: calls.__setitem__("checkpointed", calls["checkpointed"] + 1)
    )
    x = images()
    for model in (plain, checkpointed):
        model(x).logsumexp(dim=1).sum().backward()
    # the backward pass started block 0 again (a pre-hook: recomputation stops once it has what it needs)
    assert calls == {"plain": 1, "checkpointed": 2}
    for (pname, p), (_, q) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        assert (p.grad is None) == (q.grad is None), pname
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=pname)


@pytest.mark.parametrize("name", NAMES)
def test_layer_decay_groups_cover_every_parameter_once(name):
    model = create(name)
    assert hasattr(model, "group_matcher")
    groups = group_parameters(model, model.group_matcher(coarse=False))
    grouped = [pname for names in groups.values() for pname in names]
    assert sorted(grouped) == sorted(pname for pname, _ in model.named_parameters())  # each exactly once
    assert len(groups) > 2  # stem, blocks, ...: not one group
    decayed = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    in_groups = [id(p) for group in decayed for p in group["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in model.parameters())
    assert len({group["lr_scale"] for group in decayed}) > 2  # learning rates fall towards the input


@pytest.mark.parametrize("name", NAMES)
def test_meta_device_construction_allocates_nothing_and_keeps_the_structure(name):
    reference = {pname: p.shape for pname, p in create(name).named_parameters()}
    by_argument = create(name, device="meta")
    with torch.device("meta"):
        in_context = create(name)
    for model in (by_argument, in_context):
        tensors = [*model.named_parameters(), *model.named_buffers()]
        assert all(t.device.type == "meta" for _, t in tensors), [n for n, t in tensors if t.device.type != "meta"][:5]
        assert {pname: p.shape for pname, p in model.named_parameters()} == reference
    with torch.device("meta"):
        assert by_argument(torch.empty(2, 3, IMG, IMG)).shape == (2, 3)  # shapes propagate on meta
