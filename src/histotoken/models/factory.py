"""Build any model by timm name, with histotoken's extras (kwargs in a label, local weights, merging).

A *model spec* is a timm name with optional keyword arguments, written on the command line
and in study files as ``NAME`` or ``NAME:key=value,key=value``, e.g.
``cnnprune_vit_small:keep_ratio=0.5``. Values are parsed as YAML scalars (numbers, booleans).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import timm
import torch
import yaml

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A timm model name plus constructor keyword arguments."""

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs_dict(self) -> dict[str, Any]:
        return dict(self.kwargs)

    @property
    def label(self) -> str:
        """Short stable text for tables and folder names, e.g. ``cnnprune_vit_small@keep_ratio=0.5``."""
        if not self.kwargs:
            return self.name
        return self.name + "@" + ",".join(f"{k}={v}" for k, v in self.kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": self.kwargs_dict}


def parse_model_spec(text: str | dict | ModelSpec) -> ModelSpec:
    """Parse ``NAME[:key=value,...]`` (or a ``{"name":..., "kwargs":...}`` mapping) into a ModelSpec."""
    if isinstance(text, ModelSpec):
        return text
    if isinstance(text, dict):
        if "name" not in text:
            raise ValueError(f"a model entry needs a 'name' (a timm model name); got {text!r}")
        kwargs = text.get("kwargs") or {}
        return ModelSpec(str(text["name"]), tuple(sorted(kwargs.items())))
    name, _, arg_text = str(text).partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in arg_text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(
                f"cannot read model argument {item!r} in {text!r}; write NAME:key=value,key=value "
                "(e.g. cnnprune_vit_small:keep_ratio=0.5)"
            )
        kwargs[key.strip()] = yaml.safe_load(value.strip())
    return ModelSpec(name.strip(), tuple(sorted(kwargs.items())))


def check_model_name(name: str) -> None:
    """Raise a clear error for a name timm does not know (after histotoken registered its own)."""
    import histotoken.models  # noqa: F401  (registers our families)

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.6)
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise ValueError(
            f"unknown model {name!r}: not a timm model name.{hint} "
            "See `python -c \"import histotoken, timm; print(timm.list_models())\"`."
        )


def create_model(
    spec: str | ModelSpec,
    num_classes: int,
    img_size: int | None = None,
    pretrained: bool = False,
    weights: str | Path | None = None,
    merge_r: int = 0,
) -> torch.nn.Module:
    """``timm.create_model`` with our conventions.

    - ``img_size`` is passed to models that take it (ViTs, Mixers, our families); CNNs ignore it.
    - ``pretrained`` asks timm for hub weights; without network access this fails at once with a
      message naming ``--weights`` as the offline alternative.
    - ``weights`` loads a local ``.safetensors`` or timm/PyTorch checkpoint (classifier layers of a
      different class count are skipped with a warning).
    - ``merge_r`` > 0 applies token merging (ViT/DeiT only); a spec may carry it too, as
      ``deit_small_patch16_224:merge_r=13``, so one study can compare merged and unmerged models,
      and may name the placement, ``merge_mode=tome`` (default, the paper's) or
      ``merge_mode=pre_attention`` (see :mod:`histotoken.models.token_merging`), and an r
      schedule's inflection, ``merge_inflection=-1`` (ToMe's decreasing schedule; see
      :func:`histotoken.models.token_merging.r_schedule`).
    """
    spec = parse_model_spec(spec)
    check_model_name(spec.name)
    kwargs = dict(spec.kwargs_dict, num_classes=num_classes)
    merge_r = int(kwargs.pop("merge_r", 0)) or merge_r
    merge_mode = str(kwargs.pop("merge_mode", "tome"))
    merge_inflection = float(kwargs.pop("merge_inflection", 0.0))
    if img_size is not None:
        kwargs["img_size"] = img_size
    model = _create_with_fallback(spec.name, pretrained, kwargs)
    if weights is not None:
        load_weights(model, weights)
    if merge_r:
        from histotoken.models.token_merging import apply_token_merging

        apply_token_merging(model, merge_r, mode=merge_mode, inflection=merge_inflection)
    return model


def _create_with_fallback(name: str, pretrained: bool, kwargs: dict[str, Any]) -> torch.nn.Module:
    try:
        return _timm_create(name, pretrained, kwargs)
    except TypeError as error:
        if "img_size" in kwargs and "img_size" in str(error):
            # CNNs (resnet, convmixer) take any input size and have no img_size argument.
            kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
            return _timm_create(name, pretrained, kwargs)
        raise ValueError(f"model {name!r} does not accept these arguments {kwargs}: {error}") from error


def _timm_create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> torch.nn.Module:
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    from histotoken.models.pretrained import timm_pretrained

    advice = (
        "Download the weights elsewhere and pass them with --weights FILE (.safetensors or a timm "
        "checkpoint). histotoken's own families take donor files as model arguments instead, e.g. "
        "tokenlearner_vit_small:pretrained_file=deit_small.safetensors or "
        "cnnprune_vit_small:vit_pretrained_file=A,cnn_pretrained_file=B."
    )
    return timm_pretrained(name, None, advice, **kwargs)


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into ``model``; safetensors preferred, torch files loaded weights-only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist; check the --weights path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"cannot read weights file {path} ({error}); give a .safetensors file or a plain "
                "PyTorch/timm state dict"
            ) from error
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
                break
    state = {k.removeprefix("model."): v for k, v in state.items()}
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for key in skipped:
        state.pop(key)
    matched = sum(1 for key in state if key in own)
    if matched == 0:
        raise ValueError(
            f"weights file {path} matches none of the parameters of this model; "
            "was it saved from a different architecture?"
        )
    result = model.load_state_dict(state, strict=False)
    if skipped:
        logger.warning("%s: skipped %d tensors of another shape (e.g. classifier): %s", path, len(skipped), skipped[:4])
    if result.missing_keys:
        logger.warning("%s: %d parameters were not in the file and keep their initial values", path, len(result.missing_keys))
