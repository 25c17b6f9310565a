"""cnnprune_vit: CNN-scored top-k patches through a ViT, its loss, stages and pretrained parts."""

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

import histotoken  # noqa: F401  (registers the family)
from histotoken.models import cnnprune_vit
from histotoken.models.records import record_tokens

IMG, PATCH = 64, 8  # 8 x 8 = 64 patches
NUM_PATCHES = (IMG // PATCH) ** 2


def _model(keep_ratio=0.5, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(
        "cnnprune_vit_tiny", img_size=IMG, patch_size=PATCH, num_classes=3, keep_ratio=keep_ratio, **kwargs
    )


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, IMG, IMG, generator=generator), torch.tensor([0, 1, 2, 1])


@pytest.mark.parametrize("keep_ratio", [0.25, 0.5, 1.0])
def test_blocks_see_the_kept_patches_plus_the_class_token(keep_ratio, batch):
    model = _model(keep_ratio).eval()
    with record_tokens(model) as record:
        logits = model(batch[0])
    kept = round(keep_ratio * NUM_PATCHES)
    assert logits.shape == (4, 3)
    assert record.tokens_per_block == [kept + 1] * 4
    assert record.token_info["kept_indices"].shape == (4, kept)
    assert record.token_info["scores"].shape == (4, NUM_PATCHES)


def test_inference_keeps_the_highest_scored_patches(batch):
    model = _model(0.25).eval()
    with record_tokens(model) as record:
        model(batch[0])
    scores, kept = record.token_info["scores"], record.token_info["kept_indices"]
    for row in range(4):
        assert set(kept[row].tolist()) == set(scores[row].topk(kept.shape[1]).indices.tolist())


def test_flops_fall_as_keep_ratio_falls(batch):
    flops = []
    for keep_ratio in (1.0, 0.5, 0.25):
        model = _model(keep_ratio).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(batch[0])
        flops.append(counter.get_total_flops())
    assert flops[0] > flops[1] > flops[2]


@pytest.mark.parametrize("keep_ratio", [0.1, 1.5, -0.5])
def test_keep_ratio_out_of_range_is_a_clear_error(keep_ratio):
    with pytest.raises(ValueError, match="keep_ratio"):
        _model(keep_ratio)


def test_compute_loss_combines_finite_parts(batch):
    model = _model().train()
    logits = model(batch[0])
    total, parts = model.compute_loss(logits, batch[1], torch.nn.CrossEntropyLoss())
    assert set(parts) == {"vit_ce", "scorer_ce", "budget", "keep_rate", "kept_fraction"}
    assert all(torch.isfinite(value) for value in parts.values())
    expected = (
        parts["vit_ce"] + model.aux_weight * parts["scorer_ce"] + model.efficiency_weight * parts["budget"]
    )
    torch.testing.assert_close(total.detach(), expected)
    total.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize(("keep_ratio", "kept"), [(0.25, 16), (0.3, 19), (1.0, 64)])
def test_kept_fraction_is_the_share_of_patches_the_vit_read(keep_ratio, kept, batch):
    model = _model(keep_ratio).train()
    with record_tokens(model) as record:
        logits = model(batch[0])
    _, parts = model.compute_loss(logits, batch[1], torch.nn.CrossEntropyLoss())
    assert record.token_info["kept_indices"].shape[1] == kept
    assert parts["kept_fraction"].item() == pytest.approx(kept / NUM_PATCHES)


def test_shifting_every_score_changes_the_budget_penalty_but_not_the_kept_tokens_or_logits(batch):
    model = _model(0.25).eval()
    criterion = torch.nn.CrossEntropyLoss()
    with torch.no_grad(), record_tokens(model) as record:
        logits = model(batch[0])
        kept = record.token_info["kept_indices"].clone()
        _, parts = model.compute_loss(logits, batch[1], criterion)
        model.scorer.importance.bias += 3.0  # every score + 3: what the penalty pushes against
        shifted_logits = model(batch[0])
        _, shifted_parts = model.compute_loss(shifted_logits, batch[1], criterion)
    assert torch.equal(record.token_info["kept_indices"], kept)
    torch.testing.assert_close(shifted_logits, logits, rtol=1e-5, atol=1e-5)
    assert shifted_parts["kept_fraction"] == parts["kept_fraction"]
    assert shifted_parts["budget"] > parts["budget"] + 0.1


def test_scorer_class_head_shapes_the_logits_through_the_class_token(batch):
    model = _model().eval()
    model(batch[0]).sum().backward()  # timm's backward test: every parameter gets a gradient from the logits
    assert model.scorer.head.weight.grad is not None
    with torch.no_grad():
        torch.nn.init.normal_(model.evidence_proj.weight, std=0.5)  # zero at creation: a plain class token
        before = model(batch[0])
        model.scorer.head.weight.add_(1.0)
        after = model(batch[0])
    assert not torch.allclose(before, after, atol=1e-3)


def test_stage_one_trains_the_scorer_only(batch):
    model = _model().train()
    model.set_stage(1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("scorer.") for name in trainable)
    assert {"scorer.importance.weight", "scorer.head.weight"} <= trainable
    total, parts = model.compute_loss(model(batch[0]), batch[1], torch.nn.CrossEntropyLoss())
    torch.testing.assert_close(total.detach(), parts["scorer_ce"] + model.efficiency_weight * parts["budget"])
    total.backward()
    assert model.scorer.importance.weight.grad is not None
    assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith("scorer."))

    model.set_stage(2)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="stage"):
        model.set_stage(3)


def test_a_few_steps_on_a_fixed_batch_lower_the_loss(batch):
    images, target = batch
    model = _model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss, _ = model.compute_loss(model(images), target, criterion)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0]


def test_timm_interface(batch):
    model = _model().eval()
    features = model.forward_features(batch[0])
    assert features.shape == (4, round(0.5 * NUM_PATCHES) + 1, model.num_features)
    assert model.forward_head(features, pre_logits=True).shape == (4, 192)
    assert model.get_classifier() is model.head
    model.reset_classifier(7)
    assert model(batch[0]).shape == (4, 7)
    assert model.scorer.head.out_features == 7
    assert model.pretrained_cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN


def test_pretrained_parts_load_from_local_files(tmp_path):
    torch.manual_seed(1)
    vit_donor = timm.create_model("deit_tiny_patch16_224", img_size=IMG, patch_size=PATCH)
    cnn_donor = timm.create_model("resnet18")
    save_file(vit_donor.state_dict(), str(tmp_path / "deit_tiny.safetensors"))
    save_file(cnn_donor.state_dict(), str(tmp_path / "resnet18.safetensors"))
    model = timm.create_model(
        "cnnprune_vit_tiny",
        pretrained=True,
        img_size=IMG,
        patch_size=PATCH,
        num_classes=3,
        vit_pretrained_file=str(tmp_path / "deit_tiny.safetensors"),
        cnn_pretrained_file=str(tmp_path / "resnet18.safetensors"),
    )
    assert torch.equal(model.pos_embed, vit_donor.pos_embed)
    assert torch.equal(model.patch_embed.proj.weight, vit_donor.patch_embed.proj.weight)
    assert torch.equal(model.blocks[3].mlp.fc2.weight, vit_donor.blocks[3].mlp.fc2.weight)
    assert torch.equal(model.norm.weight, vit_donor.norm.weight)
    assert torch.equal(model.scorer.backbone.conv1.weight, cnn_donor.conv1.weight)
    assert torch.equal(model.scorer.backbone.layer2[1].conv2.weight, cnn_donor.layer2[1].conv2.weight)


def test_pretrained_without_network_asks_for_local_files(monkeypatch):
    create = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained and not (kwargs.get("pretrained_cfg_overlay") or {}).get("file"):
            raise OSError("no network")
        return create(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ValueError, match="cnn_pretrained_file"):
        cnnprune_vit.cnnprune_vit_tiny(pretrained=True, img_size=IMG, patch_size=PATCH)


def test_donor_files_named_in_the_spec_are_loaded_without_pretrained(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(5)
    vit_donor = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=IMG, patch_size=PATCH)
    save_file({k: v.contiguous() for k, v in vit_donor.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    model = timm.create_model("cnnprune_vit_tiny", img_size=IMG, patch_size=PATCH, num_classes=3,
                              vit_pretrained_file=str(tmp_path / "vit.safetensors"))
    assert torch.equal(model.blocks[3].mlp.fc2.weight, vit_donor.blocks[3].mlp.fc2.weight)
    with pytest.raises(ValueError, match="does not exist"):
        timm.create_model("cnnprune_vit_tiny", img_size=IMG, patch_size=PATCH, num_classes=3,
                          vit_pretrained_file=str(tmp_path / "absent.safetensors"))
