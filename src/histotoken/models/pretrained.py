"""Initialising parts of our families from timm's pretrained models ("donors").

Our families have no published weights of their own; with ``pretrained=True`` their ViT
blocks, patch embedding or CNN scorer start from a timm model's weights, fetched from the
Hugging Face hub or read from a local file. The donor is built by timm itself with our grid
(``img_size``, ``patch_size``), so timm's checkpoint filters resample position embeddings and
patch kernels. A pretrained cfg that names weights of our model itself (a file or folder written by
``histotoken export --format timm``) loads those instead (:func:`names_own_weights`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

logger = logging.getLogger(__name__)


class PretrainedWeightsError(ValueError):
    """Pretrained weights could not be had; the message says what to pass instead."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (a quick TCP connect, not a download)."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline():
    """Make huggingface_hub use its local cache only (instead of retrying for a minute offline)."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def timm_pretrained(name: str, file: str | Path | None = None, advice: str = "", **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=True)`` that fails within seconds, with ``advice``, when offline.

    With ``file`` the weights come from that local file. Without it, weights already in the local
    Hugging Face cache are used when the hub cannot be reached.
    """
    if file is not None:
        if not Path(file).is_file():
            raise PretrainedWeightsError(f"weights file {file} does not exist. {advice}")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(file))
    offline = file is None and not hub_reachable()
    try:
        with hub_offline() if offline else contextlib.nullcontext():
            return timm.create_model(name, pretrained=True, **kwargs)
    except (TypeError, PretrainedWeightsError):
        raise  # a wrong keyword argument, or a donor of ours that already explained itself
    except Exception as error:  # no network, no hub entry, unreadable file
        where = "are not in the local cache and the Hugging Face hub cannot be reached" if offline else "could not be loaded"
        raise PretrainedWeightsError(f"pretrained weights of {name!r} {where} ({type(error).__name__}: {error}). {advice}") from error


def create_donor(
    name: str, pretrained: bool = True, file: str | Path | None = None, file_argument: str = "pretrained_file", **kwargs: Any
) -> nn.Module:
    """A timm model whose pretrained weights initialise part of ours; offline errors say what to pass."""
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    advice = (
        f"Download the weights elsewhere and pass the local file as the model argument "
        f"{file_argument}=PATH/TO/{name}.safetensors"
    )
    return timm_pretrained(name, file, advice, **kwargs)


def load_donor_weights(
    model: nn.Module,
    donor: str,
    pretrained_file: str | Path | None = None,
    donor_kwargs: dict[str, Any] | None = None,
    prefixes: tuple[str, ...] = ("",),
    file_argument: str = "pretrained_file",
    require_all: bool = False,
) -> list[str]:
    """Copy the donor's tensors whose names start with ``prefixes`` into ``model``; return their keys.

    By default tensors that ``model`` lacks or shapes that differ are skipped; ``require_all``
    makes any such tensor an error (for parts that must come over whole).
    """
    donor_model = create_donor(donor, True, pretrained_file, file_argument, num_classes=0, **(donor_kwargs or {}))
    own = model.state_dict()
    selected = {key: value for key, value in donor_model.state_dict().items() if key.startswith(prefixes)}
    copied = {key: value for key, value in selected.items() if key in own and own[key].shape == value.shape}
    if require_all and len(copied) != len(selected):
        mismatched = sorted(set(selected) - set(copied))
        raise ValueError(
            f"{donor} weights do not fit {type(model).__name__} (e.g. {mismatched[:3]}); "
            "use the variant whose width matches the donor"
        )
    if not copied:
        raise ValueError(f"no tensor of {donor!r} matches this model by name and shape; choose another donor")
    model.load_state_dict(copied, strict=False)
    logger.info("initialised %d of %d tensors of %s from %s", len(copied), len(own), type(model).__name__, donor)
    return sorted(copied)


_WEIGHT_SOURCES = ("file", "state_dict", "hf_hub_id", "url")  # PretrainedCfg fields that locate weights


def names_own_weights(variant: str, kwargs: dict[str, Any]) -> bool:
    """Whether the pretrained cfg reaching ``variant``'s factory names weights of the model itself.

    Our families' registered cfgs name none, so ``pretrained=True`` means donor weights. A caller's
    ``pretrained_cfg_overlay=dict(file=...)``, ``timm.create_model("local-dir:DIR")`` or ``"hf-hub:ID"``
    (a folder written by ``histotoken export --format timm``) does: then the factory loads those weights
    with timm's ``build_model_with_cfg(..., pretrained=True)`` and no donor is fetched.
    """
    from timm.models import resolve_pretrained_cfg

    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    return any(getattr(cfg, key, None) for key in _WEIGHT_SOURCES)


def model_cfg(first_conv: str, **kwargs: Any) -> dict[str, Any]:
    """timm pretrained-config entry shared by our families: ImageNet normalisation, 224 px, no weights URL."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": first_conv,
        "classifier": "head",
        **kwargs,
    }
