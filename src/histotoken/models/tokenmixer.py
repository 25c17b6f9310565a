"""TokenMixer: a ConvMixer stem, a TokenLearner, and a small transformer on the learned tokens.

Design for histopathology (this package): local tissue texture is what convolutions do well and
cheaply, and a slide patch holds a few diagnostic regions rather than 196 equally useful ones. So:

    image -> patch conv (16 x 16, stride 16) -> GELU -> BatchNorm        (B, C, 14, 14) at 224 px
          -> mixer_depth ConvMixer layers: depthwise k x k conv + residual, pointwise 1 x 1 conv
          -> TokenLearner: 196 grid positions -> S learned tokens (default 8)
          -> [cls] + S tokens + slot embedding -> depth transformer blocks (timm ``Block``)
          -> norm -> class token (or average of the S tokens) -> head

Papers:
- ConvMixer: Trockman and Kolter, "Patches Are All You Need?", TMLR 2023 (https://arxiv.org/abs/2201.09792).
- TokenLearner: Ryoo et al., "TokenLearner: What Can 8 Learned Tokens Do for Images and Videos?",
  NeurIPS 2021 (https://arxiv.org/abs/2106.11297).

Notes:
- The depthwise kernel stays moderate (5-7): large-kernel depthwise convolutions have a slow
  backward pass on CPU (see DESIGN.md, performance facts).
- Token ``i`` always comes from attention map ``i``, so a learned *slot* embedding (one vector per
  learned token, plus one for the class token) tells the transformer which map a token came from;
  the positions themselves are already encoded in the convolutional features (zero padding).
- ``pretrained=True`` initialises the transformer blocks, final norm and class token from DeiT
  (``deit_small_patch16_224`` for small, ``deit_tiny_patch16_224`` for tiny, first ``depth``
  blocks); the convolutional stem and the TokenLearner start from scratch. A pretrained cfg that names
  weights of the model itself (``pretrained_cfg_overlay=dict(file=...)``, ``local-dir:``) loads those instead.

timm interface notes:

- No ``feature_info``, ``forward_intermediates`` or ``features_only``: the transformer blocks hold S
  learned tokens that have no grid positions, so there are no feature maps to return (the
  convolutional stem's map is a single level, not the three timm expects of a feature extractor).
  timm's own models without feature maps declare it the same way, by not having ``feature_info``;
  ``timm.create_model("tokenmixer_tiny", features_only=True)`` raises a ValueError that says so.
- ``device=`` / ``dtype=`` are accepted (``device="meta"`` builds without memory);
  ``set_grad_checkpointing`` re-computes the transformer blocks in the backward pass.
- No ``from __future__ import annotations``: TorchScript reads the annotations of scripted
  methods and cannot parse postponed ones.
"""

from functools import partial
from typing import Any

import torch
from timm.layers import to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import Block
from torch import nn

from histotoken.models.pretrained import load_donor_weights, model_cfg, names_own_weights
from histotoken.models.tokenlearner_vit import (
    attention_maps_hook,
    check_global_pool,
    init_weights,
    make_blocks,
    make_head,
    make_token_learner,
    pool_tokens,
)

__all__ = ["ConvMixerLayer", "TokenMixer"]


class ConvMixerLayer(nn.Module):
    """One ConvMixer layer: spatial mixing (depthwise conv, residual), then channel mixing (1 x 1 conv)."""

    def __init__(self, dim: int, kernel_size: int = 7, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"mixer_kernel_size must be odd, got {kernel_size}")
        self.depthwise = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.act1 = act_layer()
        self.norm1 = nn.BatchNorm2d(dim)
        self.pointwise = nn.Conv2d(dim, dim, kernel_size=1)
        self.act2 = act_layer()
        self.norm2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.norm1(self.act1(self.depthwise(x)))  # (B, C, H, W)
        return self.norm2(self.act2(self.pointwise(x)))  # (B, C, H, W)


class TokenMixer(nn.Module):
    """ConvMixer features -> TokenLearner (S tokens) -> transformer encoder -> classifier."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 384,
        mixer_depth: int = 4,
        mixer_kernel_size: int = 7,
        depth: int = 8,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        num_tokens: int = 8,
        learner: str = "v11",
        learner_hidden_dim: int = 64,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        block_fn: type[nn.Module] = Block,
        norm_layer: Any = None,
        act_layer: type[nn.Module] = nn.GELU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_global_pool(global_pool)
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.num_tokens = num_tokens
        self.patch_size = patch_size
        self.grad_checkpointing = False
        # Informational (the convolutions take any size divisible by patch_size).
        self.grid_size = tuple(size // patch_size for size in to_2tuple(img_size))

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size),
            act_layer(),
            nn.BatchNorm2d(embed_dim),
        )
        self.mixer = nn.Sequential(*[ConvMixerLayer(embed_dim, mixer_kernel_size, act_layer) for _ in range(mixer_depth)])
        self.token_learner = make_token_learner(learner, embed_dim, num_tokens, learner_hidden_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.slot_embed = nn.Parameter(torch.zeros(1, num_tokens + 1, embed_dim))
        self.blocks = make_blocks(
            depth,
            block_fn,
            drop_path_rate,
            dim=embed_dim,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_drop=proj_drop_rate,
            attn_drop=attn_drop_rate,
            norm_layer=norm_layer,
            act_layer=act_layer,
        )
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = make_head(embed_dim, num_classes, like=self.cls_token)

        trunc_normal_(self.slot_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_weights)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"slot_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stem|^mixer|^token_learner|^cls_token|^slot_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = check_global_pool(global_pool)
        self.head = make_head(self.embed_dim, num_classes, like=self.cls_token).train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mixer(self.stem(x))  # (B, 3, H_img, W_img) -> (B, C, H, W)
        learned, _ = self.token_learner(x)  # (B, C, H, W) -> (B, S, C), (B, S, N) weights
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), learned], dim=1)  # (B, S, C) -> (B, 1 + S, C)
        x = x + self.slot_embed
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    @torch.jit.ignore
    def record_token_info(self, record: Any) -> list[torch.utils.hooks.RemovableHandle]:
        """Hooks that put the learner's (B, S, H, W) ``attention_maps`` into ``record.token_info``."""
        return [self.token_learner.register_forward_hook(attention_maps_hook(record))]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(pool_tokens(x, self.global_pool, self.num_prefix_tokens))  # (B, 1 + S, C) -> (B, C)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_tokenmixer(variant: str, pretrained: bool = False, **kwargs: Any) -> TokenMixer:
    if kwargs.get("features_only"):
        raise ValueError(
            f"{variant} has no feature maps for features_only=True: its transformer holds learned tokens without "
            "grid positions; use model.forward_features(images) for the (B, 1 + S, C) tokens"
        )
    donor = kwargs.pop("pretrained_donor", None) or PRETRAINED_DONORS[variant]
    pretrained_file = kwargs.pop("pretrained_file", None)
    if pretrained and names_own_weights(variant, kwargs):  # e.g. a folder of `histotoken export --format timm`
        return build_model_with_cfg(TokenMixer, variant, pretrained=True, **kwargs)
    model = build_model_with_cfg(TokenMixer, variant, pretrained=False, **kwargs)
    if pretrained or pretrained_file is not None:  # a donor file named in the spec is loaded, --pretrained or not
        load_donor_weights(model, donor, pretrained_file, prefixes=("blocks.", "norm.", "cls_token"))
    return model


default_cfgs = generate_default_cfgs({
    "tokenmixer_small": model_cfg("stem.0"),
    "tokenmixer_tiny": model_cfg("stem.0"),
})

# timm models whose pretrained transformer blocks initialise ours when pretrained=True.
PRETRAINED_DONORS = {
    "tokenmixer_small": "deit_small_patch16_224",
    "tokenmixer_tiny": "deit_tiny_patch16_224",
}


@register_model
def tokenmixer_small(pretrained: bool = False, **kwargs: Any) -> TokenMixer:
    """384 channels, 4 ConvMixer layers (kernel 7) on 14 x 14, 8 tokens, 8 transformer blocks (6 heads)."""
    model_args = dict(embed_dim=384, mixer_depth=4, mixer_kernel_size=7, depth=8, num_heads=6, num_tokens=8)
    return _create_tokenmixer("tokenmixer_small", pretrained, **dict(model_args, **kwargs))


@register_model
def tokenmixer_tiny(pretrained: bool = False, **kwargs: Any) -> TokenMixer:
    """192 channels, 2 ConvMixer layers (kernel 5), 8 tokens, 4 transformer blocks (3 heads)."""
    model_args = dict(embed_dim=192, mixer_depth=2, mixer_kernel_size=5, depth=4, num_heads=3, num_tokens=8)
    return _create_tokenmixer("tokenmixer_tiny", pretrained, **dict(model_args, **kwargs))
