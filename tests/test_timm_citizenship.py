"""Every model histotoken registers into timm passes the generic checks timm applies to its own models.

Written after timm's ``tests/test_models.py`` (pytorch-image-models), which tests each registered name
for: a forward pass, a backward pass reaching every parameter, the default config of non-standard
(token-output) models, TorchScript, ``forward_intermediates`` for its ViTs, and FX tracing (with
timm's leaf registry; here traced output equals eager output). The names are every
timm name whose entry point lives in ``histotoken``, so a new family is checked as soon as it
registers. Input sizes follow timm's rule: the config's size when ``fixed_input_size``, else the
config's size capped at the check's target (128 px backward/TorchScript, 96 px intermediates).

Adaptations, each for a stated reason:
- backward: as timm's, through the logits alone, for every family (cnnprune's scorer head reaches
  the logits through the class token's evidence projection).
- default config: every family outputs tokens (B, N, C) or a CNN map, so all take timm's
  *non-standard* config check (the one timm applies to ViTs and Mixers).
- intermediates: only models that have ``forward_intermediates`` (timm's ViT interface); the
  others are skipped with the reason.
"""

from __future__ import annotations

import functools
import math

import pytest
import timm
import torch
from timm import set_scriptable
from torch import nn

import histotoken  # noqa: F401  (registers our families)

TARGET_BWD_SIZE = 128
TARGET_JIT_SIZE = 128
TARGET_FFEAT_SIZE = 96


def _our_names() -> list[str]:
    names = []
    for name in timm.list_models():
        module = getattr(timm.models.model_entrypoint(name), "__module__", "")
        if module.startswith("histotoken."):
            names.append(name)
    return sorted(names)


NAMES = _our_names()

# why a check does not apply to a name (pytest.skip with this reason)
NO_INTERMEDIATES = {
    "tokenmixer": "TokenMixer's blocks hold 8 learned tokens without grid positions (no ViT-style feature maps)",
}


def _input_size(model: nn.Module, target: int | None) -> tuple[int, int, int]:
    """timm's rule: the config's size when fixed, else capped at ``target``."""
    cfg = model.pretrained_cfg
    size = tuple(cfg["input_size"])
    if cfg.get("fixed_input_size") or target is None:
        return size
    return tuple(min(side, target) for side in size)


@functools.cache
def _built(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False)


def _fresh(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs)


def _images(batch: int, size: tuple[int, int, int]) -> torch.Tensor:
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))


def test_every_histotoken_family_is_in_the_list():
    assert {"cnnprune_vit_tiny", "tokenlearner_vit_tiny", "tokenmixer_tiny", "mixer_tiny", "convmixer_tiny"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_forward_gives_one_finite_row_per_image(name):
    model = _built(name).eval()
    inputs = _images(1, _input_size(model, None))
    with torch.no_grad():
        outputs = model(inputs)
    assert outputs.shape == (1, model.num_classes)
    assert not torch.isnan(outputs).any()


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name):
    model = _fresh(name, num_classes=42).train()
    inputs = _images(2, _input_size(model, TARGET_BWD_SIZE))
    outputs = model(inputs)
    assert outputs.shape == (2, 42)
    assert not torch.isnan(outputs).any()
    outputs.mean().backward()
    missing = [pname for pname, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"


@pytest.mark.parametrize("name", NAMES)
def test_default_cfg_non_std(name):
    model = _fresh(name).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    cfg = model.pretrained_cfg
    size = _input_size(model, None)
    assert max(size) <= 320
    inputs = _images(1, size)
    with torch.no_grad():
        features = model.forward_features(inputs)
        pre_logits = model.forward_head(features, pre_logits=True)
        feat_dim = -1 if features.ndim == 3 else 1  # tokens (B, N, C) or a CNN map (B, C, H, W)
        assert features.shape[feat_dim] == model.num_features
        assert pre_logits.shape[1] == model.head_hidden_size

        model.reset_classifier(0)
        assert model.num_classes == 0
        pooled = model(inputs)
        assert pooled.shape == pre_logits.shape

        headless = _fresh(name, num_classes=0).eval()
        assert headless(inputs).shape[-1 if features.ndim == 3 else 1] == model.num_features

    state_dict = model.state_dict()
    if cfg.get("num_classes"):
        classifiers = cfg["classifier"] if isinstance(cfg["classifier"], (tuple, list)) else (cfg["classifier"],)
        fresh_state = _built(name).state_dict()
        assert all(f"{c}.weight" in fresh_state for c in classifiers), classifiers
    first_convs = cfg["first_conv"] if isinstance(cfg["first_conv"], (tuple, list)) else (cfg["first_conv"],)
    assert all(f"{c}.weight" in state_dict for c in first_convs), first_convs


@pytest.mark.parametrize("name", NAMES)
def test_torchscript_forward_equals_eager(name):
    with set_scriptable(True):
        model = _fresh(name).eval()
    inputs = _images(1, _input_size(model, TARGET_JIT_SIZE))
    scripted = torch.jit.script(model)
    with torch.no_grad():
        outputs = scripted(inputs)
        expected = model(inputs)
    assert outputs.shape[0] == 1
    assert not torch.isnan(outputs).any()
    torch.testing.assert_close(outputs, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates_match_feature_info(name):
    reason = next((why for prefix, why in NO_INTERMEDIATES.items() if name.startswith(prefix)), None)
    if reason:
        pytest.skip(reason)
    model = _built(name).eval()
    if not hasattr(model, "forward_intermediates"):
        pytest.fail(f"{name} has no forward_intermediates and no stated reason in NO_INTERMEDIATES")
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(info.channels()) >= 3  # timm's check: at least 3 feature levels
    size = _input_size(model, TARGET_FFEAT_SIZE)
    inputs = _images(1, size)
    with torch.no_grad():
        output, intermediates = model.forward_intermediates(inputs, output_fmt="NCHW")
        features = model.forward_features(inputs)
    assert len(intermediates) == len(info.channels())
    for channels, reduction, feature in zip(info.channels(), info.reduction(), intermediates):
        assert feature.shape[0] == 1 and feature.shape[1] == channels
        assert feature.shape[2] <= math.ceil(size[1] / reduction) + 1
        assert feature.shape[3] <= math.ceil(size[2] / reduction) + 1
        assert not torch.isnan(feature).any()
    torch.testing.assert_close(output, features)


@pytest.mark.parametrize("name", NAMES)
def test_fx_traced_forward_equals_eager(name):
    # timm's FX checks trace with its registry of leaf modules and functions (register_notrace_*)
    from timm.models import get_notrace_functions, get_notrace_modules

    model = _built(name).eval()
    leaf_modules = tuple(get_notrace_modules())

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
            return isinstance(module, leaf_modules) or super().is_leaf_module(module, qualified_name)

    graph = Tracer(autowrap_functions=tuple(get_notrace_functions())).trace(model)
    traced = torch.fx.GraphModule(model, graph)
    inputs = _images(1, _input_size(model, TARGET_JIT_SIZE))
    with torch.no_grad():
        torch.testing.assert_close(traced(inputs), model(inputs))
