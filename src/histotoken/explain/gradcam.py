"""Grad-CAM for CNNs, Swin, MLP-Mixers and other models, through the ``grad-cam`` package.

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization", ICCV 2017 (https://arxiv.org/abs/1610.02391); implementation: ``pytorch_grad_cam``
(Jacob Gildenblat and contributors). What this module adds is the choice of the layer and, for
token models, the ``reshape_transform`` that turns its tokens into a (B, C, h, w) feature map.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from histotoken.explain.maps import normalise_maps, pool_to_grid


def _tokens_to_grid(num_prefix_tokens: int, grid_size: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, num_prefix_tokens:]  # (B, P + N, C) -> (B, N, C)
        return patches.transpose(1, 2).reshape(patches.shape[0], -1, *grid_size)  # -> (B, C, gh, gw)

    return reshape


def _channels_last_to_first(features: torch.Tensor) -> torch.Tensor:
    return features.permute(0, 3, 1, 2)  # (B, h, w, C) -> (B, C, h, w)


MIN_CAM_SIDE = 4  # a CNN's Grad-CAM layer must keep at least 4 x 4 positions (at 32 px: stride 8, not 32)


def _feature_layer(model: nn.Module, image_side: int) -> nn.Module | None:
    """The deepest of a timm CNN's feature stages (``feature_info``) that keeps MIN_CAM_SIDE positions a side.

    At 224 px that is the last stage (7 x 7 for a ResNet); on small images the last stage is 1 x 1, where
    Grad-CAM is a constant, so an earlier stage is taken.
    """
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list) or not info or not all(isinstance(i, dict) and "module" in i for i in info):
        return None
    fitting = [i for i in info if image_side // int(i.get("reduction", 1)) >= MIN_CAM_SIDE]
    chosen = (fitting or info[:1])[-1]
    try:
        return model.get_submodule(chosen["module"])
    except AttributeError:
        return None


def target_layer(
    model: nn.Module, image_side: int = 224
) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor] | None]:
    """The layer Grad-CAM reads for ``model`` and the reshape its output needs (None: already (B, C, h, w))."""
    from timm.models.mlp_mixer import MlpMixer
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, SwinTransformer):
        return model.layers[-1], _channels_last_to_first  # timm Swin stages output (B, h, w, C)
    if isinstance(model, MlpMixer):
        return model.blocks[-1], _tokens_to_grid(0, tuple(model.stem.grid_size))
    if isinstance(model, VisionTransformer):
        grid = tuple(model.patch_embed.grid_size)
        return model.blocks[-1].norm1, _tokens_to_grid(int(model.num_prefix_tokens), grid)
    layer = _feature_layer(model, image_side)
    if layer is not None:
        return layer, None
    for name in ("layer4", "stages", "blocks", "features"):  # ResNet, ConvNeXt/EfficientNet, ConvMixer, ...
        module = getattr(model, name, None)
        if isinstance(module, nn.Sequential) and len(module):
            return module[-1], None
        if isinstance(module, nn.Module) and not isinstance(module, nn.Sequential):
            return module, None
    convolutions = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    if not convolutions:
        raise ValueError(f"cannot choose a Grad-CAM layer for {type(model).__name__}: it has no known feature layer")
    return convolutions[-1], None


def gradcam_maps(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, grid_size: tuple[int, int]
) -> torch.Tensor:
    """(B, 3, H, W) normalised images, (B,) class indices -> (B, gh, gw) Grad-CAM maps pooled onto the grid."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer, reshape = target_layer(model, min(images.shape[-2:]))
    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        pixels = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets])  # (B, H, W)
    return normalise_maps(pool_to_grid(torch.from_numpy(pixels), grid_size))
