"""Token merging applied to timm ViT/DeiT models through hooks."""

import copy

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from histotoken.models.factory import create_model
from histotoken.models.records import record_tokens
from histotoken.models.token_merging import apply_token_merging, r_schedule, remove_token_merging

IMG = 64  # 64 px, 8 px patches: 64 patch tokens


def _vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=IMG, patch_size=8, depth=4, num_classes=5, **kwargs
    )


def _deit_distilled():
    torch.manual_seed(0)
    return timm.create_model(
        "deit_tiny_distilled_patch16_224", img_size=IMG, patch_size=8, depth=4, num_classes=5
    )


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))


MODES = ["tome", "pre_attention"]


def recorded(model, images):
    """The record of one forward pass of ``model`` on ``images``."""
    with record_tokens(model) as record:
        model(images)
    return record


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("build", [_vit, _deit_distilled], ids=["vit", "deit_distilled"])
def test_r_zero_output_is_bit_identical_to_the_plain_model(build, mode, images):
    model = build().eval()
    expected = model(images)
    apply_token_merging(model, 0, mode=mode)
    with record_tokens(model) as record:
        assert torch.equal(model(images), expected)
    assert record.tokens_per_block == [model.num_prefix_tokens + 64] * 4


@pytest.mark.parametrize(
    ("build", "prefix"), [(_vit, 1), (_deit_distilled, 2)], ids=["vit", "deit_distilled"]
)
def test_tome_attention_of_block_i_sees_n_minus_i_r_tokens(build, prefix, images):
    model = apply_token_merging(build().eval(), 6)
    assert recorded(model, images).tokens_per_block == [prefix + 64 - 6 * i for i in range(4)]


def test_tome_merges_between_attention_and_mlp(images):
    model = apply_token_merging(_vit().eval(), 6)
    seen = {"attn": [], "mlp": []}
    for block in model.blocks:
        for part in seen:
            getattr(block, part).register_forward_hook(lambda m, args, out, part=part: seen[part].append(args[0].shape[1]))
    model(images)
    assert seen["attn"] == [65, 59, 53, 47]
    assert seen["mlp"] == [59, 53, 47, 41]  # each MLP already works on the block's merged tokens


@pytest.mark.parametrize(
    ("build", "prefix"), [(_vit, 1), (_deit_distilled, 2)], ids=["vit", "deit_distilled"]
)
def test_pre_attention_mode_merges_at_the_block_input(build, prefix, images):
    model = apply_token_merging(build().eval(), 6, mode="pre_attention")
    assert recorded(model, images).tokens_per_block == [prefix + 64 - 6 * (i + 1) for i in range(4)]


@pytest.mark.parametrize(("mode", "expected"), [("tome", [65, 33, 17, 9]), ("pre_attention", [33, 17, 9, 5])])
def test_large_r_is_clipped_per_block_to_half_the_patch_tokens(mode, expected, images):
    model = apply_token_merging(_vit().eval(), 32, mode=mode)
    with record_tokens(model) as record:
        out = model(images)
    assert record.tokens_per_block == expected
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("mode", MODES)
def test_token_sizes_conserve_the_patch_count(mode, images):
    model = apply_token_merging(_vit().eval(), 7, mode=mode)
    sizes = recorded(model, images).token_info["token_sizes"]  # (B, N_final, 1)
    assert sizes.shape == (2, 65 - 4 * 7, 1)
    assert sizes[:, 0].flatten().tolist() == [1.0, 1.0]  # the class token is never merged
    assert sizes.sum(dim=1).flatten().tolist() == [65.0, 65.0]


@pytest.mark.parametrize("mode", MODES)
def test_merging_identical_tokens_with_proportional_attention_changes_no_logit(mode):
    # A uniform image and no position embedding make all 64 patch tokens identical in every block.
    # Merged duplicates with proportional attention weigh exactly like the copies they replace.
    model = _vit().eval()
    with torch.no_grad():
        model.pos_embed.zero_()
    image = torch.full((1, 3, IMG, IMG), 0.3)
    expected = model(image)
    apply_token_merging(model, 16, mode=mode)
    with record_tokens(model) as record:
        merged = model(image)
    assert record.tokens_per_block[-1] < 40
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_proportional_attention_is_off_in_training_unless_asked(mode, images):
    plain = apply_token_merging(_vit(), 8, mode=mode, proportional_attention=False).train()
    default = apply_token_merging(_vit(), 8, mode=mode).train()
    in_training = apply_token_merging(_vit(), 8, mode=mode, proportional_attention_in_training=True).train()
    assert torch.equal(default(images), plain(images))
    assert not torch.allclose(in_training(images), plain(images))
    assert not torch.allclose(default.eval()(images), plain.eval()(images))  # on at inference


@pytest.mark.parametrize("r", [-1, 33])
def test_r_out_of_range_is_a_clear_error(r):
    with pytest.raises(ValueError, match="merge_r"):
        apply_token_merging(_vit(), r)


def test_a_cnn_is_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="VisionTransformer"):
        apply_token_merging(timm.create_model("resnet18", num_classes=2), 4)


@pytest.mark.parametrize("mode", MODES)
def test_merged_model_trains_gradients_reach_every_parameter(mode, images):
    model = apply_token_merging(_vit(), 8, mode=mode).train()
    with record_tokens(model) as record:
        loss = torch.nn.functional.cross_entropy(model(images), torch.tensor([1, 3]))
    loss.backward()
    missing = [
        name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
    ]
    assert not missing
    assert record.tokens_per_block == ([65, 57, 49, 41] if mode == "tome" else [57, 49, 41, 33])


def test_flops_fall_as_r_grows(images):
    flops = []
    for r in (0, 4, 12):
        model = apply_token_merging(_vit().eval(), r)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(images)
        flops.append(counter.get_total_flops())
    assert flops[0] > flops[1] > flops[2]
    assert flops[2] < 0.7 * flops[0]


def test_proportional_attention_reaches_the_attention(images):
    with_bias = apply_token_merging(_vit().eval(), 8)
    without_bias = apply_token_merging(_vit().eval(), 8, proportional_attention=False)
    with record_tokens(with_bias) as record_with, record_tokens(without_bias) as record_without:
        out_with, out_without = with_bias(images), without_bias(images)
    assert record_with.tokens_per_block == record_without.tokens_per_block
    assert not torch.allclose(out_with, out_without)


def test_token_metric_option_merges_the_same_number_of_tokens(images):
    model = apply_token_merging(_vit().eval(), 8, metric="tokens")
    assert recorded(model, images).tokens_per_block == [65, 57, 49, 41]
    with pytest.raises(ValueError, match="metric"):
        apply_token_merging(_vit(), 8, metric="queries")


def test_applying_a_new_r_keeps_the_placement_unless_told(images):
    model = apply_token_merging(_vit().eval(), 8, mode="pre_attention")
    apply_token_merging(model, 4)
    assert recorded(model, images).tokens_per_block == [61, 57, 53, 49]
    apply_token_merging(model, 4, mode="tome")
    assert recorded(model, images).tokens_per_block == [65, 61, 57, 53]


@pytest.mark.parametrize("mode", MODES)
def test_removing_merging_restores_the_plain_token_counts(mode):
    model = timm.create_model("vit_mini_patch4_32", num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    plain_counts = recorded(model, x).tokens_per_block
    assert plain_counts == [65] * 4
    apply_token_merging(model, 8, mode=mode)
    assert recorded(model, x).tokens_per_block[-1] < plain_counts[-1]
    remove_token_merging(model)
    assert recorded(model, x).tokens_per_block == plain_counts


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="merge_mode"):
        apply_token_merging(_vit(), 8, mode="post_mlp")


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_is_unchanged_and_remove_restores_the_plain_model(mode, images):
    model = _vit().eval()
    expected = model(images)
    keys = list(model.state_dict())
    apply_token_merging(model, 8, mode=mode)
    assert list(model.state_dict()) == keys
    assert not torch.allclose(model(images), expected)
    remove_token_merging(model)
    assert torch.equal(model(images), expected)
    assert not any("forward" in vars(block) for block in model.blocks)


def test_deepcopy_merges_on_the_copy_and_forward_writes_nothing_on_the_model(images):
    model = apply_token_merging(_vit().eval(), 8)
    clone = copy.deepcopy(model)
    before = set(vars(clone))
    with record_tokens(model) as record:
        clone(images[:1])
    assert record.passes == 0  # the record on the original saw nothing of the copy's pass
    assert recorded(clone, images[:1]).tokens_per_block == [65, 57, 49, 41]
    assert set(vars(clone)) == before
    assert not hasattr(clone, "tokens_per_block") and not hasattr(clone, "token_info")
    torch.testing.assert_close(clone(images), model(images))


def test_bf16_autocast_forward_is_finite(images):
    model = apply_token_merging(_vit().eval(), 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
        out = model(images)
    assert torch.isfinite(out.float()).all()


def test_factory_applies_merge_r_and_merge_mode_from_the_model_spec(images):
    model = create_model("vit_tiny_patch16_224:depth=3,merge_r=5,patch_size=8", num_classes=2, img_size=IMG)
    assert recorded(model.eval(), images).tokens_per_block == [65, 60, 55]
    spec = "vit_tiny_patch16_224:depth=3,merge_r=5,merge_mode=pre_attention,patch_size=8"
    model = create_model(spec, num_classes=2, img_size=IMG)
    assert recorded(model.eval(), images).tokens_per_block == [60, 55, 50]
    spec = "vit_tiny_patch16_224:depth=3,merge_r=5,merge_inflection=-1,patch_size=8"
    model = create_model(spec, num_classes=2, img_size=IMG)  # r schedule 10, 5, 0
    assert recorded(model.eval(), images).tokens_per_block == [65, 55, 50]


def test_gradient_checkpointing_with_merging_is_a_clear_error(images):
    model = apply_token_merging(_vit().train(), 4)
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="checkpointing"):
        model(images)


# --------------------------------------------------------------------------- r schedules (ToMe's parse_r)


def test_r_schedule_list_pads_missing_blocks_with_zero_and_rejects_extra_blocks():
    assert r_schedule([6, 3], 4) == [6, 3, 0, 0]
    assert r_schedule(5, 3) == [5, 5, 5]
    with pytest.raises(ValueError, match="schedule"):
        r_schedule([1, 2, 3, 4, 5], 4)


def test_r_schedule_inflection_matches_hand_computed_ramps():
    # decreasing (-1): first = int(8 * 2) = 16, last = 2 * 8 - 16 = 0, step -16/3:
    # 16, 10.67 -> 10, 5.33 -> 5, 0
    assert r_schedule(8, 4, inflection=-1) == [16, 10, 5, 0]
    # +0.5: first = int(6 * 0.5) = 3, last = 9, step 2
    assert r_schedule(6, 4, inflection=0.5) == [3, 5, 7, 9]
    # -0.25 with r = 5 over 3 blocks: first = int(6.25) = 6, last = 4, step -1
    assert r_schedule(5, 3, inflection=-0.25) == [6, 5, 4]
    with pytest.raises(ValueError, match="inflection"):
        r_schedule(5, 3, inflection=2)


@pytest.mark.parametrize(("mode", "expected"), [("tome", [65, 55, 52, 52]), ("pre_attention", [55, 52, 52, 52])])
def test_list_schedule_merges_exactly_those_tokens_per_block(mode, expected, images):
    # r = 10, 3, 0, 0: tome's attention of block i sees 65 minus the merges of blocks before it,
    # pre_attention's block i sees them after its own merge
    model = apply_token_merging(_vit().eval(), [10, 3], mode=mode)
    record = recorded(model, images)
    assert record.tokens_per_block == expected
    assert record.token_info["token_sizes"].shape == (2, 52, 1)


def test_inflected_schedule_gives_the_hand_computed_token_counts(images):
    model = apply_token_merging(_vit().eval(), 8, inflection=-1)  # r = 16, 10, 5, 0
    assert model.merge_schedule == [16, 10, 5, 0]
    assert recorded(model, images).tokens_per_block == [65, 49, 39, 34]


def test_a_schedule_entry_beyond_half_the_patches_is_a_clear_error():
    with pytest.raises(ValueError, match="merge_r=40"):
        apply_token_merging(_vit(), [4, 40])
