"""ViT with a TokenLearner: after a few blocks, S learned tokens replace the N patch tokens.

Paper: Ryoo et al., "TokenLearner: What Can 8 Learned Tokens Do for Images and Videos?",
NeurIPS 2021 (https://arxiv.org/abs/2106.11297), section 3 and the ViT experiments (TokenLearner
inserted in the middle of the network, 8 tokens).

Layout (the ViT parts are timm's ``PatchEmbed`` and ``Block``, with timm's parameter names, so
DeiT/ViT weights load by name):

    image -> patch_embed -> [cls] + N patch tokens + pos_embed
          -> blocks[:learner_after]                         (1 + N tokens)
          -> token_learner: N patch tokens -> S tokens       (the class token is kept as is)
          -> blocks[learner_after:]                         (1 + S tokens)
          -> (fuse=True: token_fuser maps the S tokens back onto the N positions,
              residual with the patch tokens that entered the learner -> 1 + N tokens)
          -> norm -> pool (class token; ``avg`` over the non-class tokens when fuse=True) -> head

``learner_after`` is the number of blocks that run on all tokens (default depth // 2, i.e. the
learner sits after the middle block). With fuse=True the class token sees only the S learned
tokens, so the head pools the fused tokens by average (``global_pool="avg"``); asking for
``global_pool="token"`` with fuse=True is an error, since the fuser would then not change the output.

timm interface notes:

- Feature levels (``feature_info``, ``forward_intermediates``, ``features_only=True`` through timm's
  ``FeatureGetterNet``) are the maps that lie on the patch grid: the embedded patch tokens (level 0,
  what block 0 receives) and the outputs of the ``learner_after`` blocks before the learner. Later
  blocks hold S learned tokens without grid positions. Level 0 is included so that the mini
  variant (learner after block 2) has the three levels timm expects of a feature extractor.
- ``prune_intermediate_layers`` removes only the final norm and the head: the blocks after the
  last grid level are what the learned tokens come from, so they stay.
- ``device=`` / ``dtype=`` are accepted (``device="meta"`` builds without memory);
  ``set_grad_checkpointing`` re-computes the blocks in the backward pass.
- No ``from __future__ import annotations``: TorchScript reads the annotations of scripted
  methods and cannot parse postponed ones.
"""

import logging
from functools import partial
from typing import Any

import torch
from timm.layers import PatchEmbed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from histotoken.layers.tokenlearner import TokenFuser, TokenLearner, TokenLearnerConv
from histotoken.models.pretrained import load_donor_weights, model_cfg, names_own_weights

__all__ = ["TokenLearnerViT", "make_blocks", "make_head", "make_token_learner", "pool_tokens"]

logger = logging.getLogger(__name__)

LEARNERS = ("v11", "conv")
GLOBAL_POOLS = ("token", "avg", "")


def make_token_learner(
    learner: str, dim: int, num_tokens: int, hidden_dim: int = 64
) -> TokenLearner | TokenLearnerConv:
    """The TokenLearner variant named ``learner``: ``"v11"`` (MLP + softmax) or ``"conv"`` (v1)."""
    if learner == "v11":
        return TokenLearner(dim, num_tokens, hidden_dim=hidden_dim)
    if learner == "conv":
        return TokenLearnerConv(dim, num_tokens)
    raise ValueError(f"learner must be one of {LEARNERS}, got {learner!r}")


def drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    """Stochastic-depth rate of each block, rising linearly from 0 to ``drop_path_rate``.

    Plain Python (not ``torch.linspace(...).tolist()``), so that a model builds inside a
    ``torch.device("meta")`` context, where tensors hold no values.
    """
    if depth <= 1:
        return [0.0] * depth
    return [drop_path_rate * index / (depth - 1) for index in range(depth)]


def make_blocks(depth: int, block_fn: type[nn.Module], drop_path_rate: float, **block_kwargs: Any) -> nn.Sequential:
    """``depth`` transformer blocks with stochastic depth rising linearly to ``drop_path_rate``."""
    rates = drop_path_rates(drop_path_rate, depth)
    return nn.Sequential(*[block_fn(drop_path=rates[index], **block_kwargs) for index in range(depth)])


def make_head(in_features: int, num_classes: int, like: torch.Tensor) -> nn.Module:
    """A linear classifier on ``like``'s device and dtype (``nn.Identity`` for num_classes 0)."""
    if num_classes <= 0:
        return nn.Identity()
    return nn.Linear(in_features, num_classes, device=like.device, dtype=like.dtype)


def check_global_pool(global_pool: str) -> str:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
    return global_pool


def pool_tokens(x: torch.Tensor, global_pool: str, num_prefix_tokens: int = 1) -> torch.Tensor:
    """``"token"``: the class token; ``"avg"``: mean of the other tokens; ``""``: all tokens unpooled."""
    if global_pool == "avg":
        return x[:, num_prefix_tokens:].mean(dim=1)  # (B, P + T, C) -> (B, C)
    if global_pool == "token":
        return x[:, 0]  # (B, P + T, C) -> (B, C)
    return x


def attention_maps_hook(record: Any):
    """Forward hook for a TokenLearner: its (B, S, N) weights as (B, S, gh, gw) ``record.token_info["attention_maps"]``.

    The grid is the learner's (B, C, gh, gw) input, or the ``grid_size`` passed with (B, N, C) tokens.
    """

    def hook(module: nn.Module, args: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        grid_size = tuple(args[0].shape[-2:]) if args[0].ndim == 4 else tuple(args[1])
        record.token_info["attention_maps"] = output[1].detach().unflatten(2, grid_size)  # (B, S, gh, gw)

    return hook


def init_weights(module: nn.Module) -> None:
    """ViT initialisation: truncated-normal linear weights (std 0.02), zero biases."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class TokenLearnerViT(nn.Module):
    """Vision Transformer whose patch tokens are reduced to ``num_tokens`` by a TokenLearner."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str | None = None,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        num_tokens: int = 8,
        learner_after: int | None = None,
        learner: str = "v11",
        learner_hidden_dim: int = 64,
        fuse: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
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
        learner_after = depth // 2 if learner_after is None else int(learner_after)
        if not 0 <= learner_after <= depth:
            raise ValueError(f"learner_after must be between 0 and depth={depth}, got {learner_after}")
        global_pool = ("avg" if fuse else "token") if global_pool is None else global_pool
        self._check_pool(global_pool, fuse)
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.num_tokens = num_tokens
        self.learner_after = learner_after
        self.fuse = fuse
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
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
        self.token_learner = make_token_learner(learner, embed_dim, num_tokens, learner_hidden_dim)
        self.token_fuser = TokenFuser(embed_dim, num_tokens, hidden_dim=learner_hidden_dim) if fuse else None
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = make_head(embed_dim, num_classes, like=self.cls_token)

        reduction = self.patch_embed.patch_size[0]
        self.feature_info = [dict(module="patch_embed", num_chs=embed_dim, reduction=reduction)] + [
            dict(module=f"blocks.{index}", num_chs=embed_dim, reduction=reduction) for index in range(learner_after)
        ]  # the embedded patches and the blocks that run on the patch grid
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_weights)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @staticmethod
    def _check_pool(global_pool: str, fuse: bool) -> None:
        check_global_pool(global_pool)
        if fuse and global_pool == "token":
            raise ValueError(
                "fuse=True with global_pool='token' would ignore the fused tokens; use global_pool='avg'"
            )

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self._check_pool(global_pool, self.fuse)
            self.global_pool = global_pool
        self.head = make_head(self.embed_dim, num_classes, like=self.cls_token).train(self.training)

    @torch.jit.ignore
    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Remove the final norm and the head when asked; the blocks stay (see module docstring)."""
        take_indices, _ = feature_take_indices(len(self.feature_info), indices)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")  # as timm's ViT: forward then returns the unpooled tokens
        return take_indices

    def _learn_tokens(self, x: torch.Tensor, grid_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the N patch tokens by S learned ones: (1 + S tokens, the N patch tokens)."""
        cls_token, patches = x[:, :1], x[:, 1:]  # (B, 1 + N, C) -> (B, 1, C), (B, N, C)
        learned, _ = self.token_learner(patches, grid_size)  # -> (B, S, C), (B, S, N) weights
        return torch.cat([cls_token, learned], dim=1), patches  # (B, 1 + S, C)

    @torch.jit.ignore
    def record_token_info(self, record: Any) -> list[torch.utils.hooks.RemovableHandle]:
        """Hooks that put the learner's (B, S, gh, gw) ``attention_maps`` into ``record.token_info``."""
        return [self.token_learner.register_forward_hook(attention_maps_hook(record))]

    def _fuse_tokens(self, x: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Map the S learned tokens back onto the N positions (residual on the learner's input)."""
        cls_token, learned = x[:, :1], x[:, 1:]  # (B, 1 + S, C) -> (B, 1, C), (B, S, C)
        fused = patches + self.token_fuser(learned, patches)  # (B, S, C), (B, N, C) -> (B, N, C)
        return torch.cat([cls_token, fused], dim=1)  # (B, 1 + N, C)

    def _run_blocks(
        self, x: torch.Tensor, take_indices: list[int], norm: bool, output_fmt: str
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Embed, run every block (the learner after ``learner_after``), optionally fuse.

        Returns the final tokens before the last norm and the outputs of the blocks in
        ``take_indices`` (all before the learner), as grids (B, C, H, W) or tokens (B, N, C).
        """
        x = self.patch_embed(x)  # (B, 3, H_img, W_img) -> (B, N, C)
        grid_size = self.patch_embed.grid_size
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N, C) -> (B, 1 + N, C)
        x = self.pos_drop(x + self.pos_embed)
        intermediates: list[torch.Tensor] = []
        if 0 in take_indices:  # level 0: the embedded patches
            intermediates.append(self._grid(x, norm, output_fmt, grid_size))
        patches = x[:, 1:]  # replaced by the learner's input patch tokens below
        for index, block in enumerate(self.blocks):
            if index == self.learner_after:
                x, patches = self._learn_tokens(x, grid_size)  # (B, 1 + N, C) -> (B, 1 + S, C)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x)
            else:
                x = block(x)
            if index + 1 in take_indices:  # level index + 1: the output of block index
                intermediates.append(self._grid(x, norm, output_fmt, grid_size))
        if self.learner_after == len(self.blocks):
            x, patches = self._learn_tokens(x, grid_size)
        if self.token_fuser is not None:
            x = self._fuse_tokens(x, patches)  # (B, 1 + S, C) -> (B, 1 + N, C)
        return x, intermediates

    def _grid(self, x: torch.Tensor, norm: bool, output_fmt: str, grid_size: tuple[int, int]) -> torch.Tensor:
        """(B, 1 + N, C) tokens -> the patch tokens as (B, C, H, W) for ``"NCHW"``, else (B, N, C)."""
        grid = (self.norm(x) if norm else x)[:, self.num_prefix_tokens :]  # (B, N, C)
        if output_fmt == "NCHW":
            grid = grid.transpose(1, 2).unflatten(2, grid_size)  # (B, N, C) -> (B, C, H, W)
        return grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self._run_blocks(x, [], False, "NLC")
        return self.norm(x)

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs of the blocks that run on the patch grid, like timm's ``VisionTransformer.forward_intermediates``.

        Level 0 is the embedded patches, level ``i`` the output of block ``i - 1``, up to the
        ``learner_after`` blocks that see the N patch tokens; later blocks hold S learned tokens with
        no grid position (``feature_info`` lists the levels). ``stop_early`` is accepted for timm's interface; the whole model always runs,
        so the final features equal ``forward_features``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, _ = feature_take_indices(len(self.feature_info), indices)
        x, intermediates = self._run_blocks(x, take_indices, norm, output_fmt)
        return intermediates if intermediates_only else (self.norm(x), intermediates)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(pool_tokens(x, self.global_pool, self.num_prefix_tokens))  # (B, 1 + T, C) -> (B, C)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def feature_cfg(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``features_only=True``: timm's FeatureGetterNet over ``forward_intermediates``, last 3 levels by default."""
    return dict(out_indices=kwargs.pop("out_indices", 3), feature_cls="getter")


def _create_tokenlearner_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> TokenLearnerViT:
    donor = kwargs.pop("pretrained_donor", None) or PRETRAINED_DONORS[variant]
    pretrained_file = kwargs.pop("pretrained_file", None)
    kwargs.setdefault("feature_cfg", feature_cfg(kwargs))
    if pretrained and names_own_weights(variant, kwargs):  # e.g. a folder of `histotoken export --format timm`
        return build_model_with_cfg(TokenLearnerViT, variant, pretrained=True, **kwargs)
    # Our own cfg has no weights: timm builds the model untrained, the donor supplies the ViT parts.
    model = build_model_with_cfg(TokenLearnerViT, variant, pretrained=False, **kwargs)
    if pretrained or pretrained_file is not None:  # a donor file named in the spec is loaded, --pretrained or not
        donor_kwargs = dict(img_size=model.patch_embed.img_size, patch_size=model.patch_embed.patch_size)
        load_donor_weights(model, donor, pretrained_file, donor_kwargs)
    return model


default_cfgs = generate_default_cfgs({
    "tokenlearner_vit_small": model_cfg("patch_embed.proj", fixed_input_size=True, paper_ids="arXiv:2106.11297"),
    "tokenlearner_vit_tiny": model_cfg("patch_embed.proj", fixed_input_size=True, paper_ids="arXiv:2106.11297"),
})

# timm models whose pretrained weights initialise the ViT parts when pretrained=True
# (override with pretrained_donor=, e.g. "vit_small_patch16_224" for the small variant).
PRETRAINED_DONORS = {
    "tokenlearner_vit_small": "deit_small_patch16_224",
    "tokenlearner_vit_tiny": "deit_tiny_patch16_224",
}


@register_model
def tokenlearner_vit_small(pretrained: bool = False, **kwargs: Any) -> TokenLearnerViT:
    """ViT-Small/16 (DeiT-S sizes), 8 learned tokens after block 6 of 12."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, num_tokens=8)
    return _create_tokenlearner_vit("tokenlearner_vit_small", pretrained, **dict(model_args, **kwargs))


@register_model
def tokenlearner_vit_tiny(pretrained: bool = False, **kwargs: Any) -> TokenLearnerViT:
    """ViT-Tiny/16 widths (DeiT-Ti), 6 blocks, 8 learned tokens after block 3 (for tests and CPU demos)."""
    model_args = dict(patch_size=16, embed_dim=192, depth=6, num_heads=3, num_tokens=8)
    return _create_tokenlearner_vit("tokenlearner_vit_tiny", pretrained, **dict(model_args, **kwargs))



# --------------------------------------------------------------------------- 32 px prototyping (CIFAR-10)
# The Keras TokenLearner example (keras.io/examples/vision/token_learner) trains a mini ViT on
# CIFAR-10: 4 transformer layers of width 128, 4 heads, TokenLearner to a few tokens after the
# second layer. These two variants are that setting at 32 px with patch 4 (64 patch tokens -> 8).

default_cfgs.update(generate_default_cfgs({
    "tokenlearner_vit_mini": model_cfg(
        "patch_embed.proj", fixed_input_size=True, input_size=(3, 32, 32), crop_pct=1.0, paper_ids="arXiv:2106.11297"
    ),
    "vit_mini_patch4_32": model_cfg("patch_embed.proj", fixed_input_size=True, input_size=(3, 32, 32), crop_pct=1.0),
}))
MINI_ARGS = dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0)


@register_model
def tokenlearner_vit_mini(pretrained: bool = False, **kwargs: Any) -> TokenLearnerViT:
    """Mini ViT for 32 px (patch 4, 4 blocks of width 128), 64 patch tokens -> 8 learned tokens after block 2."""
    _check_mini_pretrained("tokenlearner_vit_mini", pretrained, kwargs)
    model_args = dict(MINI_ARGS, num_tokens=8, learner_after=2)
    return build_model_with_cfg(
        TokenLearnerViT, "tokenlearner_vit_mini", pretrained, feature_cfg=feature_cfg(kwargs), **dict(model_args, **kwargs)
    )


def _check_mini_pretrained(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> None:
    if pretrained and not names_own_weights(variant, kwargs):
        raise ValueError(
            f"{variant} has no published pretrained weights; it is trained from scratch (CIFAR-10 prototyping), "
            "or loaded from a local file with pretrained_cfg_overlay=dict(file=PATH)"
        )


class TokenCountingViT(VisionTransformer):
    """timm's VisionTransformer, unchanged; every block sees the class token and all N patch tokens.

    The subclass stays so that saved models keep their class name; token counts come from
    :func:`histotoken.models.records.record_tokens`, as for every model.
    """


@register_model
def vit_mini_patch4_32(pretrained: bool = False, **kwargs: Any) -> TokenCountingViT:
    """The same mini ViT without TokenLearner (all 64 patch tokens in every block): timm's VisionTransformer."""
    _check_mini_pretrained("vit_mini_patch4_32", pretrained, kwargs)
    return build_model_with_cfg(
        TokenCountingViT, "vit_mini_patch4_32", pretrained, feature_cfg=feature_cfg(kwargs), **dict(MINI_ARGS, **kwargs)
    )
