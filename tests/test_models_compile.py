"""Every registered family, and a token-merged DeiT, runs one forward and backward under ``torch.compile``.

Backend ``eager``: Dynamo captures the graphs, then runs them with eager kernels. Dynamo's capture
is where our code can break (attributes written in forward such as cnnprune's loss inputs on
``self``, hooks, per-instance block forwards, data-dependent shapes). ``aot_eager`` also traces the
backward; it passed for every family when tried, but took 30 s for cnnprune alone on a shared
2-core machine, and inductor adds minutes of C++ compilation without testing our code further.
Graph breaks are allowed; errors and wrong outputs are not: the compiled logits and loss must equal
the eager ones, and every parameter must get a gradient.
"""

import copy

import pytest
import timm
import torch
from torch import nn

import histotoken  # noqa: F401  (registers our families)
from histotoken.models.token_merging import apply_token_merging

IMG = 64
FAMILIES = ["cnnprune_vit_tiny", "tokenlearner_vit_tiny", "tokenmixer_tiny", "mixer_tiny", "convmixer_tiny"]


def _family(name):
    kwargs = {"gumbel": False} if name.startswith("cnnprune") else {}  # no sampling: eager and compiled agree
    return timm.create_model(name, img_size=IMG, num_classes=3, **kwargs)


def _merged_deit(mode):
    model = timm.create_model("deit_tiny_patch16_224", img_size=IMG, patch_size=8, depth=3, num_classes=3)
    return apply_token_merging(model, 8, mode=mode)


def _loss(model, logits, target):
    criterion = nn.CrossEntropyLoss()
    if hasattr(model, "compute_loss"):
        return model.compute_loss(logits, target, criterion)[0]
    return criterion(logits, target)


def _check_compiled_step(model, backend):
    torch.manual_seed(0)
    model.train()
    eager_model = copy.deepcopy(model)
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([0, 2])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    logits = compiled(images)
    loss = _loss(model, logits, target)
    loss.backward()
    expected_logits = eager_model(images)
    expected_loss = _loss(eager_model, expected_logits, target)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-4, atol=1e-5)
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    return model


@pytest.mark.parametrize("name", FAMILIES)
def test_family_compiles_for_one_forward_and_backward(name):
    model = _check_compiled_step(_family(name), "eager")
    assert all(isinstance(count, int) for count in model.tokens_per_block)  # recorded by the compiled forward


@pytest.mark.parametrize("mode", ["tome", "pre_attention"])
def test_token_merged_deit_compiles_and_still_records_its_tokens(mode):
    model = _check_compiled_step(_merged_deit(mode), "eager")
    assert len(model.tokens_per_block) == 3
    assert model.tokens_per_block[-1] < 1 + 64
