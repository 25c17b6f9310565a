"""Small MLP-Mixer and ConvMixer baselines, built from timm's own classes.

timm's smallest registered variants (``mixer_s32_224``: 512 wide, 8 blocks; ``convmixer_768_32``:
768 wide, 32 layers, about 1 img/s to train on a 2-core CPU) are too big for CPU demos and tests,
so this module registers two small ones. The architectures are timm's, unchanged.

Papers:
- MLP-Mixer: Tolstikhin et al., "MLP-Mixer: An all-MLP Architecture for Vision", NeurIPS 2021
  (https://arxiv.org/abs/2105.01601).
- ConvMixer: Trockman and Kolter, "Patches Are All You Need?", TMLR 2023 (https://arxiv.org/abs/2201.09792).

No pretrained weights exist for these sizes; ``pretrained=True`` needs a local file given as
``pretrained_cfg_overlay=dict(file=PATH)``.
"""

from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.convmixer import ConvMixer
from timm.models.mlp_mixer import MlpMixer
from timm.models.mlp_mixer import checkpoint_filter_fn as mixer_checkpoint_filter_fn

from histotoken.models.pretrained import model_cfg

__all__ = ["TokenCountingConvMixer", "TokenCountingMlpMixer"]


class TokenCountingMlpMixer(MlpMixer):
    """timm's MlpMixer, unchanged; every mixer block processes all N patch tokens (no class token).

    The subclass stays so that saved models keep their class name; token counts come from
    :func:`histotoken.models.records.record_tokens`, as for every model.
    """


class TokenCountingConvMixer(ConvMixer):
    """timm's ConvMixer; a CNN, so it records no token counts. Takes any image size.

    ``img_size`` is accepted (and ignored) so that every histotoken family is built the same way.
    """

    def __init__(self, *args: Any, img_size: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)


def _create(model_cls: type, variant: str, pretrained: bool, **kwargs: Any) -> torch.nn.Module:
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and not overlay.get("file"):
        raise ValueError(
            f"{variant} has no published pretrained weights; train it, or pass a local file with "
            "pretrained_cfg_overlay=dict(file=PATH)"
        )
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=mixer_checkpoint_filter_fn if model_cls is TokenCountingMlpMixer else None,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


default_cfgs = generate_default_cfgs({
    "mixer_tiny": model_cfg("stem.proj", fixed_input_size=True),
    "convmixer_tiny": model_cfg("stem.0"),
})


@register_model
def mixer_tiny(pretrained: bool = False, **kwargs: Any) -> MlpMixer:
    """MLP-Mixer, 192 wide, 6 blocks, patch 16 (mixer_s16_224 is 512 wide, 8 blocks)."""
    model_args = dict(patch_size=16, num_blocks=6, embed_dim=192)
    return _create(TokenCountingMlpMixer, "mixer_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def convmixer_tiny(pretrained: bool = False, **kwargs: Any) -> ConvMixer:
    """ConvMixer-256/8, kernel 5, patch 8 (a moderate kernel: large depthwise kernels are slow on CPU)."""
    model_args = dict(dim=256, depth=8, kernel_size=5, patch_size=8)
    return _create(TokenCountingConvMixer, "convmixer_tiny", pretrained, **dict(model_args, **kwargs))
