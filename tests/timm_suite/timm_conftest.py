"""conftest for running timm's own ``tests/test_models.py`` on the names histotoken registers.

Copied next to timm's test file (as ``conftest.py``) by ``tests/test_timm_suite.py``; not loaded by
histotoken's own test session. It imports :mod:`histotoken.models` first, so our families are in
timm's registry, then narrows ``timm.list_models`` / ``timm.list_pretrained`` (which timm's test
module calls at import time to parametrize its tests) to our names, with timm's own include and
exclude patterns applied unchanged.

timm selects some tests by patterns that name *its* modules and model names, which ours cannot
match. Two rules put our names where timm puts its own families of the same kind:

- token-output models (``forward_features`` returns (B, N, C) tokens, as timm's ViTs and Mixers do)
  count as matched by a pattern list that holds timm's non-standard patterns (``'vit_*'``), as
  ``deit_*`` and ``vit_*`` are;
- models with ``forward_intermediates`` and a ``feature_info`` count as matched by a module list that
  holds ``'vision_transformer'`` (timm's list of families with ``forward_intermediates`` and
  ``features_only`` through ``FeatureGetterNet``).
"""

from __future__ import annotations

import fnmatch
import os

import timm
import torch

import histotoken.models  # noqa: F401  (registers our families)

_timm_list_models = timm.list_models


def _ours() -> list[str]:
    return sorted(
        name for name in _timm_list_models()
        if getattr(timm.models.model_entrypoint(name), "__module__", "").startswith("histotoken.")
    )


OUR_NAMES = _ours()
if os.environ.get("HISTOTOKEN_TIMM_NAMES"):  # a subset, e.g. the tiny variants only
    OUR_NAMES = [name for name in OUR_NAMES if name in os.environ["HISTOTOKEN_TIMM_NAMES"].split(",")]


def _kinds(name: str) -> tuple[bool, bool]:
    """(outputs tokens, has forward_intermediates + feature_info) for ``name``, built at its default size."""
    with torch.no_grad():
        model = timm.create_model(name).eval()
        size = model.pretrained_cfg["input_size"]
        tokens = model.forward_features(torch.zeros(1, *size)).ndim == 3
    return tokens, hasattr(model, "forward_intermediates") and bool(getattr(model, "feature_info", None))


KINDS = {name: _kinds(name) for name in OUR_NAMES}
TOKEN_OUTPUT = {name for name, (tokens, _) in KINDS.items() if tokens}
FEATURE_FAMILIES = {name for name, (_, features) in KINDS.items() if features}


def _patterns(value) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def _matches(name: str, patterns: list[str], declared: bool) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns) or declared


def list_models(filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False, include_tags=None):
    filters, modules, excludes = _patterns(filter), _patterns(module), _patterns(exclude_filters)
    selected = []
    for name in _timm_list_models(pretrained=pretrained, name_matches_cfg=name_matches_cfg, include_tags=include_tags):
        base = name.split(".")[0]
        if base not in OUR_NAMES:
            continue
        non_std = base in TOKEN_OUTPUT
        if filters and not _matches(name, filters, non_std and "vit_*" in filters):
            continue
        if excludes and _matches(name, excludes, non_std and "vit_*" in excludes):
            continue
        if modules:
            own_module = timm.models.model_entrypoint(base).__module__.split(".")[-1]
            declared = base in FEATURE_FAMILIES and "vision_transformer" in modules
            if not (any(fnmatch.fnmatch(own_module, pattern) for pattern in modules) or declared):
                continue
        selected.append(name)
    return selected


def list_pretrained(filter="", exclude_filters=""):
    return list_models(filter, pretrained=True, exclude_filters=exclude_filters, include_tags=True)


timm.list_models = list_models
timm.list_pretrained = list_pretrained
