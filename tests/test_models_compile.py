"""Every registered family, and a token-merged DeiT, runs one forward and backward under ``torch.compile``.

Backend ``eager``: Dynamo captures the graphs, then runs them with eager kernels. Dynamo's capture
is where our code can break (attributes written in forward such as cnnprune's loss inputs on
``self``, hooks, per-instance block forwards, data-dependent shapes). ``aot_eager`` also traces the
backward; it passed for every family when tried, but took 30 s for cnnprune alone on a shared
2-core machine, and inductor adds minutes of C++ compilation without testing our code further.
Graph breaks are allowed; errors and wrong outputs are not: the compiled logits and loss must equal
the eager ones, and every parameter must get a gradient. Token counts are recorded by hooks
(``record_tokens``) around the compiled forward, as the engine records them.

The default backend, ``inductor``, is tested too (``@pytest.mark.inductor``): every family, in
inference at 64 px with fewer blocks than its tiny variant (the C++ compilation time grows with the
number of operations; 1-2 minutes a family at full tiny depth on a shared 2-core machine), gives the
eager logits.
"""

import copy

import pytest
import timm
import torch
from torch import nn

import histotoken  # noqa: F401  (registers our families)
from histotoken.models.records import record_tokens
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
    with record_tokens(model) as record:
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
    return record


@pytest.mark.parametrize("name", FAMILIES)
def test_family_compiles_for_one_forward_and_backward(name):
    record = _check_compiled_step(_family(name), "eager")
    assert all(isinstance(count, int) for count in record.tokens_per_block)  # hooks ran around the compiled forward
    if name != "convmixer_tiny":
        assert record.tokens_per_block


@pytest.mark.parametrize("mode", ["tome", "pre_attention"])
def test_token_merged_deit_compiles_and_still_records_its_tokens(mode):
    record = _check_compiled_step(_merged_deit(mode), "eager")
    assert len(record.tokens_per_block) == 3
    assert record.tokens_per_block == ([65, 57, 49] if mode == "tome" else [57, 49, 41])


# fewer blocks than the tiny variants: inductor's compile time grows with the number of operations
SHALLOW = {
    "cnnprune_vit_tiny": dict(depth=2, gumbel=False),
    "tokenlearner_vit_tiny": dict(depth=2, learner_after=1),
    "tokenmixer_tiny": dict(depth=1, mixer_depth=1),
    "mixer_tiny": dict(num_blocks=2),
    "convmixer_tiny": dict(depth=2),
}


@pytest.mark.inductor
@pytest.mark.parametrize("name", FAMILIES)
def test_family_compiles_with_inductor_and_gives_the_eager_logits(name):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=IMG, num_classes=3, **SHALLOW[name]).eval()
    torch.nn.init.normal_(model.get_classifier().weight, std=0.5)  # timm zeroes some heads: logits must vary
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(images)
        logits = torch.compile(model)(images)  # the default backend: inductor
    assert expected.std() > 1e-3  # logits that vary, so that agreement means something
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
