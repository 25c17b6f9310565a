"""Every model family histotoken registers into timm keeps timm's interface and our token contract.

The names come from timm's registry (modules of ``histotoken.models``), so a new family is tested
as soon as it registers. Images are 64 px with patch 8 (an 8 x 8 grid) to keep this fast; the
backward checks run on the cheap variants (``_small`` ones are built and run forward only).
"""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
from torch import nn

import histotoken  # noqa: F401  (registers our families)
from histotoken.models.records import record_tokens

FAMILY_MODULES = ("tokenlearner_vit", "tokenmixer", "cnnprune_vit", "small_baselines")
MODEL_NAMES = sorted({name for module in FAMILY_MODULES for name in timm.list_models(module=module)})
CHEAP_NAMES = [name for name in MODEL_NAMES if "_small" not in name]
IMG_SIZE = 64
BATCH = 2


@functools.cache
def _built(name: str, num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    try:
        return timm.create_model(name, img_size=IMG_SIZE, patch_size=8, num_classes=num_classes)
    except TypeError as error:
        if "patch_size" not in str(error):
            raise
        return timm.create_model(name, img_size=IMG_SIZE, num_classes=num_classes)


def create(name: str, num_classes: int = 8) -> nn.Module:
    """A fresh copy of ``name`` built at 64 px, with patch 8 where the family has a patch size."""
    return copy.deepcopy(_built(name, num_classes))


def images() -> torch.Tensor:
    return torch.randn(BATCH, 3, IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(1))


def loss_of(model: nn.Module, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    criterion = nn.CrossEntropyLoss()
    if hasattr(model, "compute_loss"):
        result = model.compute_loss(logits, target, criterion)
        return result[0] if isinstance(result, tuple) else result
    return criterion(logits, target)


def test_our_families_are_registered():
    assert {"tokenlearner_vit_small", "tokenlearner_vit_tiny", "tokenmixer_small", "tokenmixer_tiny"} <= set(
        MODEL_NAMES
    )
    assert {"mixer_tiny", "convmixer_tiny"} <= set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_gives_one_logit_per_class_and_writes_nothing_on_the_model(name):
    model = create(name).eval()
    before = {key: value for key, value in vars(model).items() if not key.startswith("_")}
    with torch.no_grad(), record_tokens(model) as record:
        logits = model(images())
    assert logits.shape == (BATCH, 8)
    assert torch.isfinite(logits).all()
    assert model.num_classes == 8
    assert {key: value for key, value in vars(model).items() if not key.startswith("_")} == before
    assert not hasattr(model, "tokens_per_block") and not hasattr(model, "token_info")
    assert record.passes == 1
    assert all(isinstance(count, int) and count > 0 for count in record.tokens_per_block)
    if "convmixer" not in name:  # a CNN: no tokens
        assert len(record.tokens_per_block) == len(model.blocks)
    assert all(not value.requires_grad for value in record.token_info.values())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_binary_model_gives_two_logits(name):
    model = create(name, num_classes=2).eval()
    with torch.no_grad():
        assert model(images()).shape == (BATCH, 2)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_head_of_forward_features_equals_forward(name):
    model = create(name).eval()
    x = images()
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        split = model.forward_head(features)
        whole = model(x)
    assert pre_logits.shape == (BATCH, model.num_features)
    torch.testing.assert_close(split, whole)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_reset_classifier_changes_the_number_of_outputs(name):
    model = create(name).eval()
    model.reset_classifier(3)
    assert model.num_classes == 3
    assert isinstance(model.get_classifier(), nn.Module)
    with torch.no_grad():
        assert model(images()).shape == (BATCH, 3)


def _stages(model: nn.Module) -> list[int | None]:
    if hasattr(model, "set_stage"):
        return list(range(1, int(model.num_stages) + 1))
    return [None]


@pytest.mark.parametrize("name", CHEAP_NAMES)
def test_every_trainable_parameter_gets_a_finite_gradient(name):
    model = create(name).train()
    x = images()
    target = torch.tensor([1, 6])
    for stage in _stages(model):
        if stage is not None:
            model.set_stage(stage)
        model.zero_grad(set_to_none=True)
        logits = model(x)
        assert not torch.isnan(logits).any()
        loss = loss_of(model, logits, target)
        assert torch.isfinite(loss)
        loss.backward()
        trainable = [(pname, p) for pname, p in model.named_parameters() if p.requires_grad]
        assert trainable, f"stage {stage}: nothing to train"
        missing = [pname for pname, p in trainable if p.grad is None]
        assert not missing, f"stage {stage}: no gradient for {missing[:5]}"
        not_finite = [pname for pname, p in trainable if not torch.isfinite(p.grad).all()]
        assert not not_finite, f"stage {stage}: non-finite gradient for {not_finite[:5]}"
