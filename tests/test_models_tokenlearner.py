"""tokenlearner_vit_* and tokenmixer_*: token counts, cost, options and pretrained initialisation.

Tiny variants at 64 px with patch 8: an 8 x 8 grid, so 64 patch tokens (+1 class token).
"""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

import histotoken  # noqa: F401  (registers our families)
from histotoken.models.records import record_tokens

SMALL_INPUT = dict(img_size=64, patch_size=8)


def create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **dict(SMALL_INPUT, num_classes=3, **kwargs)).eval()


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def forward_flops(model: torch.nn.Module) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images(1))
    return counter.get_total_flops()


# --- tokenlearner_vit ----------------------------------------------------------------------------


def test_vit_tiny_runs_half_its_blocks_on_eight_learned_tokens_plus_class_token():
    model = create("tokenlearner_vit_tiny")
    with torch.no_grad(), record_tokens(model) as record:
        features = model.forward_features(images())
    assert len(model.blocks) == 6
    assert record.tokens_per_block == [65, 65, 65, 9, 9, 9]
    assert features.shape == (2, 9, 192)


def test_vit_small_uses_vit_small_sizes_and_the_middle_block():
    model = create("tokenlearner_vit_small")
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (384, 12, 6)
    assert model.patch_embed.patch_size == (8, 8)  # the kwarg overrides the default 16
    with torch.no_grad(), record_tokens(model) as record:
        model(images())
    assert record.tokens_per_block == [65] * 6 + [9] * 6


@pytest.mark.parametrize(
    ("learner_after", "num_tokens", "expected"),
    [
        (1, 4, [65] + [5] * 5),
        (0, 8, [9] * 6),
        (6, 8, [65] * 6),
        (5, 16, [65] * 5 + [17]),
    ],
)
def test_vit_learner_position_and_token_count_follow_the_kwargs(learner_after, num_tokens, expected):
    model = create("tokenlearner_vit_tiny", learner_after=learner_after, num_tokens=num_tokens)
    with torch.no_grad(), record_tokens(model) as record:
        features = model.forward_features(images())
    assert record.tokens_per_block == expected
    assert features.shape[1] == num_tokens + 1  # learned tokens leave the network, even after the last block


def test_vit_learner_after_beyond_depth_is_refused():
    with pytest.raises(ValueError, match="learner_after"):
        create("tokenlearner_vit_tiny", learner_after=7)


@pytest.mark.parametrize("learner", ["v11", "conv"])
def test_vit_attention_maps_cover_the_patch_grid(learner):
    model = create("tokenlearner_vit_tiny", learner=learner)
    with torch.no_grad(), record_tokens(model) as record:
        model(images())
    maps = record.token_info["attention_maps"]
    assert maps.shape == (2, 8, 8, 8)
    assert not maps.requires_grad
    if learner == "v11":
        torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, 8))


def test_unknown_learner_is_refused():
    with pytest.raises(ValueError, match="learner"):
        create("tokenlearner_vit_tiny", learner="v2")


@pytest.mark.parametrize("name", ["tokenlearner_vit_tiny", "tokenmixer_tiny"])
def test_flops_fall_as_num_tokens_falls(name):
    flops = [forward_flops(create(name, num_tokens=count)) for count in (32, 16, 8, 4)]
    assert flops == sorted(flops, reverse=True)
    assert len(set(flops)) == 4


def test_vit_with_learner_costs_less_than_without():
    reduced = forward_flops(create("tokenlearner_vit_tiny"))
    unreduced = forward_flops(create("tokenlearner_vit_tiny", learner_after=6))  # learner after the last block
    assert reduced < 0.75 * unreduced


def test_vit_fuse_returns_all_patch_positions_and_trains_the_fuser():
    model = create("tokenlearner_vit_tiny", fuse=True).train()
    with record_tokens(model) as record:
        features = model.forward_features(images())
    assert features.shape == (2, 65, 192)
    assert record.tokens_per_block == [65, 65, 65, 9, 9, 9]
    assert model.global_pool == "avg"
    model.forward_head(features).logsumexp(dim=1).sum().backward()
    for name, parameter in model.token_fuser.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_vit_fuse_with_class_token_pooling_is_refused():
    with pytest.raises(ValueError, match="fuse=True"):
        create("tokenlearner_vit_tiny", fuse=True, global_pool="token")
    model = create("tokenlearner_vit_tiny", fuse=True)
    with pytest.raises(ValueError, match="fuse=True"):
        model.reset_classifier(2, global_pool="token")


def test_vit_avg_pool_uses_the_learned_tokens_not_the_class_token():
    model = create("tokenlearner_vit_tiny", global_pool="avg")
    with torch.no_grad():
        features = model.forward_features(images())
        pooled = model.forward_head(features, pre_logits=True)
    torch.testing.assert_close(pooled, features[:, 1:].mean(dim=1))


# --- tokenmixer ----------------------------------------------------------------------------------


def test_tokenmixer_transformer_sees_only_learned_tokens_plus_class_token():
    model = create("tokenmixer_tiny")
    with torch.no_grad(), record_tokens(model) as record:
        features = model.forward_features(images())
    assert record.tokens_per_block == [9] * len(model.blocks)
    assert features.shape == (2, 9, 192)
    maps = record.token_info["attention_maps"]
    assert maps.shape == (2, 8, 8, 8)  # 64 px / patch 8 -> 8 x 8 grid
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, 8))


def test_tokenmixer_small_has_an_eight_block_encoder_on_a_14x14_grid_at_224():
    model = timm.create_model("tokenmixer_small")
    assert len(model.blocks) == 8
    assert model.grid_size == (14, 14)
    assert model.mixer[0].depthwise.kernel_size[0] <= 7  # large depthwise kernels are slow on CPU


def test_tokenmixer_num_tokens_and_conv_learner_follow_the_kwargs():
    model = create("tokenmixer_tiny", num_tokens=4, learner="conv")
    with torch.no_grad(), record_tokens(model) as record:
        model(images())
    assert record.tokens_per_block == [5] * len(model.blocks)
    assert record.token_info["attention_maps"].shape == (2, 4, 8, 8)


# --- pretrained initialisation from a local file -------------------------------------------------


@pytest.fixture(scope="module")
def deit_tiny_file(tmp_path_factory):
    """A DeiT-Tiny state dict (random weights: no network) saved as safetensors."""
    torch.manual_seed(123)
    donor = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "deit_tiny.safetensors"
    state = {key: value.contiguous() for key, value in donor.state_dict().items()}
    save_file(state, str(path))
    return path, state


def test_vit_pretrained_file_initialises_blocks_embeddings_and_norm(deit_tiny_file):
    path, donor_state = deit_tiny_file
    model = create("tokenlearner_vit_tiny", pretrained=True, pretrained_file=str(path))
    own = model.state_dict()
    for key in ("blocks.0.attn.qkv.weight", "blocks.5.mlp.fc2.weight", "blocks.3.norm1.bias", "cls_token"):
        torch.testing.assert_close(own[key], donor_state[key], rtol=0, atol=0)
    # timm resamples the 16 px patch kernel and the 14 x 14 position grid to patch 8 on 8 x 8
    resampled = timm.create_model(
        "deit_tiny_patch16_224", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path)), **SMALL_INPUT
    ).state_dict()
    for key in ("patch_embed.proj.weight", "pos_embed"):
        torch.testing.assert_close(own[key], resampled[key], rtol=0, atol=0)
    # the copy replaced the ViT's own initialisation; the TokenLearner (not in DeiT) keeps its own
    fresh = create("tokenlearner_vit_tiny").state_dict()
    assert not torch.equal(own["blocks.0.attn.qkv.weight"], fresh["blocks.0.attn.qkv.weight"])
    torch.testing.assert_close(own["token_learner.fc1.weight"], fresh["token_learner.fc1.weight"], rtol=0, atol=0)
    with torch.no_grad():
        assert model(images()).shape == (2, 3)


def test_tokenmixer_pretrained_file_initialises_its_transformer_blocks(deit_tiny_file):
    path, donor_state = deit_tiny_file
    model = create("tokenmixer_tiny", pretrained=True, pretrained_file=str(path))
    own = model.state_dict()
    for index in range(len(model.blocks)):
        key = f"blocks.{index}.attn.proj.weight"
        torch.testing.assert_close(own[key], donor_state[key], rtol=0, atol=0)


def test_missing_pretrained_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        create("tokenlearner_vit_tiny", pretrained=True, pretrained_file=str(tmp_path / "absent.safetensors"))


def test_unreachable_hub_asks_for_a_local_weights_file(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network (simulated)")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", offline)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", offline)
    with pytest.raises(ValueError, match="pretrained_file"):
        create("tokenlearner_vit_tiny", pretrained=True)


@pytest.mark.parametrize("name", ["tokenlearner_vit_tiny", "tokenmixer_tiny"])
def test_a_donor_file_named_in_the_spec_is_loaded_without_pretrained(deit_tiny_file, name):
    path, donor_state = deit_tiny_file
    model = create(name, pretrained_file=str(path))  # no pretrained=True: the named file still counts
    torch.testing.assert_close(model.state_dict()["blocks.0.attn.proj.weight"], donor_state["blocks.0.attn.proj.weight"],
                               rtol=0, atol=0)


def test_a_missing_donor_file_named_in_the_spec_is_an_error_without_pretrained(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        create("tokenlearner_vit_tiny", pretrained_file=str(tmp_path / "absent.safetensors"))
