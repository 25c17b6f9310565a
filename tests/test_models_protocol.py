"""Each registered family satisfies the engine-hook protocols it claims; a plain timm CNN claims none."""

import pytest
import timm

import histotoken  # noqa: F401  (registers our families)
from histotoken.models.protocol import CustomLoss, StagedTraining, TokenReporting

# the protocols each family claims (what the engine may rely on)
CLAIMS = {
    "cnnprune_vit_tiny": {CustomLoss, StagedTraining, TokenReporting},
    "tokenlearner_vit_tiny": {TokenReporting},
    "tokenmixer_tiny": {TokenReporting},
    "mixer_tiny": set(),  # timm's classes: token counts need no hook of the model (record_tokens counts them)
    "convmixer_tiny": set(),
}
PROTOCOLS = (CustomLoss, StagedTraining, TokenReporting)


def _build(name):
    return timm.create_model(name, num_classes=3, img_size=64) if name != "resnet18" else timm.create_model(name)


@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_family_satisfies_the_protocols_it_claims_before_any_forward_pass(name):
    model = _build(name)
    claimed = CLAIMS[name]
    for protocol in PROTOCOLS:
        assert isinstance(model, protocol) == (protocol in claimed), protocol.__name__


def test_staged_family_declares_an_integer_stage_count():
    model = _build("cnnprune_vit_tiny")
    assert isinstance(model.num_stages, int) and model.num_stages == 2


def test_plain_timm_resnet_claims_no_hook():
    model = timm.create_model("resnet18", num_classes=3)
    assert not any(isinstance(model, protocol) for protocol in PROTOCOLS)


def test_token_merging_makes_a_plain_vit_record_token_sizes_and_removal_undoes_it():
    import torch

    from histotoken.models.records import record_tokens
    from histotoken.models.token_merging import apply_token_merging, remove_token_merging

    model = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=2, num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)

    def recorded():
        with record_tokens(model) as record:
            model(x)
        return record

    assert recorded().token_info == {} and recorded().tokens_per_block == [65, 65]
    apply_token_merging(model, 4)
    merged = recorded()
    assert merged.tokens_per_block == [65, 61] and merged.token_info["token_sizes"].sum().item() == 65
    remove_token_merging(model)
    assert recorded().token_info == {} and recorded().tokens_per_block == [65, 65]
