"""CNN-guided token pruning: a cheap CNN scores every patch, a ViT reads only the best ones.

The idea follows token-pruning ViTs that score patches with a separate light network and keep the
top-k (DynamicViT, Rao et al., NeurIPS 2021, https://arxiv.org/abs/2106.02034; and CNN-guided
selection in histopathology, where tissue regions differ greatly in diagnostic value), with the
scorer's class head pooled by its own importance map as in attention-based multiple-instance
learning (Ilse, Tomczak and Welling, ICML 2018, https://arxiv.org/abs/1802.04712).

Architecture (``cnnprune_vit_small``: DeiT-Small ViT; ``cnnprune_vit_tiny``: 192 wide, 4 deep):

1. Scorer: ``resnet18`` truncated after ``layer2`` (stride 8) via ``features_only``, run on the
   image downscaled by ``scorer_scale`` (default 0.5). At 224 px with 16 px patches its 14 x 14 map
   is exactly the ViT's patch grid; otherwise it is resized to the grid. This costs about 5% of
   DeiT-Small's FLOPs. Two heads on the grid: one importance logit per ViT patch (1x1 conv) and class
   logits from the features pooled with ``softmax(importance)`` over the patches.
2. The ViT embeds all patches (``timm.layers.PatchEmbed``, 1-2% of the cost), adds position
   embeddings, keeps the ``k = round(keep_ratio * N)`` patches with the highest importance
   (:func:`histotoken.layers.topk.select_topk_tokens`), prepends the class token (plus projections
   of the scorer's pooled features and of its class logits, both starting at zero, so the ViT knows
   about the pruned regions and what the scorer made of them) and runs timm ``Block``s on the
   ``k + 1`` tokens. Through the class-logit projection the scorer's class head also shapes the
   output, so every parameter gets a gradient from the logits (timm's backward test).

Training (hooks used by histotoken's engine):

- ``compute_loss``: ViT cross-entropy + ``aux_weight`` x scorer cross-entropy +
  ``efficiency_weight`` x ``(mean keep probability - keep_ratio)^2``.
- The importance scores learn from two signals: the scorer's class loss through the attention
  pooling (patches that predict the class get high scores), and, end to end, the ViT loss through
  the straight-through gate on the kept tokens. The budget penalty fixes the level of the scores
  so that ``sigmoid(score)`` reads as a keep probability with mean ``keep_ratio``.
- What the penalty does, since ``k`` is fixed: nothing to the number of kept tokens, which is
  always ``k``, and nothing to *which* tokens are kept or to the scorer's pooling, since top-k and
  softmax ignore a shift of all scores. It only sets the shift: it keeps the scores where
  ``sigmoid`` is not saturated, so that the straight-through gradient ``p (1 - p)`` reaching the
  scores does not vanish, and it makes ``keep_rate`` (the mean keep probability, logged) comparable
  with ``kept_fraction`` (``k / N``, the fraction of patch tokens the ViT actually read, also logged).
- ``num_stages = 2``. Stage 1 (scorer warm-up): the ViT is frozen and the loss is the scorer's
  cross-entropy plus the budget penalty, so the importance map is learnt from the class signal
  alone (attention-MIL) before the ViT depends on it; the ViT loss is logged, not optimised.
  Stage 2: everything trains with the full loss. A new model is in stage 2.

timm interface notes: ``features_only=True`` uses timm's ``FeatureGetterNet`` over
``forward_intermediates`` (the kept tokens on the patch grid, pruned patches zero); ``device=`` and
``dtype=`` are accepted (``device="meta"`` builds without memory); ``set_grad_checkpointing``
re-computes the blocks in the backward pass. This file has no ``from __future__ import annotations``:
TorchScript reads the annotations of scripted methods and cannot parse postponed ones.
"""

import logging
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, register_notrace_function, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.vision_transformer import Block
from torch import nn
from torch.fx._symbolic_trace import is_fx_tracing

from histotoken.layers.topk import select_topk_tokens
from histotoken.models.pretrained import create_donor, load_donor_weights, model_cfg, names_own_weights
from histotoken.models.tokenlearner_vit import drop_path_rates, make_head

__all__ = ["CNNPruneViT", "PatchScorer"]

logger = logging.getLogger(__name__)

KEEP_RATIO_RANGE = (0.2, 1.0)


@register_notrace_function  # shape-dependent branches: one opaque call in an FX graph
def resize_to_grid(features: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, gh, gw): area-average when shrinking, bilinear when growing."""
    if features.shape[-2] == grid_size[0] and features.shape[-1] == grid_size[1]:
        return features
    if features.shape[-2] >= grid_size[0] and features.shape[-1] >= grid_size[1]:
        return F.adaptive_avg_pool2d(features, grid_size)
    return F.interpolate(features, size=grid_size, mode="bilinear", align_corners=False)


@register_notrace_function  # shape-dependent branch: one opaque call in an FX graph
def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size) by area averaging; unchanged when already that size."""
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="area")
    return images


class PatchScorer(nn.Module):
    """Truncated ResNet18 at low resolution: one importance logit per ViT patch, plus class logits.

    ``forward(images)`` returns ``scores`` (B, N), ``logits`` (B, num_classes) and ``pooled``
    (B, C) features (the importance-weighted average of the grid features).
    """

    def __init__(
        self,
        num_classes: int,
        grid_size: tuple[int, int],
        img_size: int,
        scale: float = 0.5,
        stage_index: int = 2,
        in_chans: int = 3,
        pretrained: bool = False,
        pretrained_file: str | None = None,
    ) -> None:
        super().__init__()
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.img_size = max(32, int(round(img_size * scale)))
        self.backbone = create_donor(
            "resnet18",
            pretrained,
            pretrained_file,
            "cnn_pretrained_file",
            features_only=True,
            out_indices=(stage_index,),
            in_chans=in_chans,
        )
        self.num_features = int(self.backbone.feature_info.channels()[-1])
        self.importance = nn.Conv2d(self.num_features, 1, kernel_size=1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = resize_images(images, self.img_size)
        images = images.contiguous(memory_format=torch.channels_last)  # conv nets run faster so on CPU
        features = self.backbone(images)[-1]  # (B, C, h, w)
        features = resize_to_grid(features, self.grid_size)  # (B, C, gh, gw)
        scores = self.importance(features).flatten(1)  # (B, 1, gh, gw) -> (B, N)
        tokens = features.flatten(2).transpose(1, 2)  # (B, C, gh, gw) -> (B, N, C)
        weights = scores.float().softmax(dim=1).to(tokens.dtype)  # (B, N) attention-MIL pooling
        pooled = torch.einsum("bn,bnc->bc", weights, tokens)  # (B, C)
        return scores, self.head(pooled), pooled


class TokenSelector(nn.Module):
    """The top-k patch selection as a module (no parameters), so that hooks can see which patches were kept.

    ``forward(tokens, scores, k, gumbel)``: :func:`histotoken.layers.topk.select_topk_tokens` with the
    module's training flag.
    """

    def forward(
        self, tokens: torch.Tensor, scores: torch.Tensor, k: int, gumbel: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return select_topk_tokens(tokens, scores, k, training=self.training, gumbel=gumbel)


class CNNPruneViT(nn.Module):
    """ViT that reads only the ``keep_ratio`` most important patches, chosen by a CNN scorer."""

    num_stages = 2

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        keep_ratio: float = 0.5,
        aux_weight: float = 0.3,
        efficiency_weight: float = 1.0,
        scorer_scale: float = 0.5,
        scorer_stage: int = 2,
        gumbel: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        cnn_pretrained: bool = False,
        cnn_pretrained_file: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Args:
            keep_ratio: fraction of patches the ViT reads, in [0.2, 1.0]; ``k = round(keep_ratio * N)``.
            aux_weight: weight of the scorer's cross-entropy in the stage-2 loss.
            efficiency_weight: weight of the keep-budget penalty.
            scorer_scale: the scorer sees the image at this fraction of its size.
            scorer_stage: last ResNet18 stage the scorer runs (1-4; 2 = stride 8, 128 channels).
            gumbel: Gumbel-top-k exploration while training (see ``histotoken.layers.topk``).
            cnn_pretrained, cnn_pretrained_file: build the scorer from pretrained ``resnet18``.
            device, dtype: where and in which dtype the parameters are created (timm's factory arguments).
        """
        super().__init__()
        low, high = KEEP_RATIO_RANGE
        if not isinstance(keep_ratio, (int, float)) or not low <= keep_ratio <= high:
            raise ValueError(
                f"keep_ratio={keep_ratio!r} is out of range: give the fraction of patches to keep, "
                f"between {low} and {high} (e.g. keep_ratio=0.5)"
            )
        if global_pool != "token":
            raise ValueError(f"CNNPruneViT pools with its class token only; got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.keep_ratio = float(keep_ratio)
        self.aux_weight = float(aux_weight)
        self.efficiency_weight = float(efficiency_weight)
        self.gumbel = gumbel
        self.stage = 2
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
        )
        num_patches = self.patch_embed.num_patches
        self.num_kept = max(1, round(self.keep_ratio * num_patches))
        self.scorer = PatchScorer(
            num_classes,
            self.patch_embed.grid_size,
            img_size=self.patch_embed.img_size[0],
            scale=scorer_scale,
            stage_index=scorer_stage,
            in_chans=in_chans,
            pretrained=cnn_pretrained,
            pretrained_file=cnn_pretrained_file,
        )
        self.selector = TokenSelector()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        # the scorer's pooled view of the whole image (pruned patches included) joins the class token
        self.context_proj = nn.Linear(self.scorer.num_features, embed_dim)
        # ... and so does its class evidence (its class logits), so the scorer's head also serves the ViT
        self.evidence_proj = self._make_evidence_proj(num_classes, embed_dim)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        drop_path = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(
            *[
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=True,
                    proj_drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=drop_path[i],
                    norm_layer=norm_layer,
                )
                for i in range(depth)
            ]
        )
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        reduction = self.patch_embed.patch_size[0]
        self.feature_info = [dict(module=f"blocks.{index}", num_chs=embed_dim, reduction=reduction) for index in range(depth)]
        self._outputs: dict[str, torch.Tensor] = {}
        self._init_weights()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in [self.context_proj, self.blocks, self.head]:
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    trunc_normal_(layer.weight, std=0.02)
                    nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.context_proj.weight)  # starts as a plain ViT class token (pretrained DeiT intact)
        if isinstance(self.evidence_proj, nn.Linear):
            nn.init.zeros_(self.evidence_proj.weight)

    # --- timm interface -------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay: embeddings and scorer first, then each block."""
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed|^scorer|^context_proj|^evidence_proj",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New ViT head and scorer class head for ``num_classes`` (0 = features only), on the model's device and dtype."""
        if global_pool not in (None, "token"):
            raise ValueError(f"CNNPruneViT pools with its class token only; got global_pool={global_pool!r}")
        self.num_classes = num_classes
        like = self.cls_token
        self.head = make_head(self.embed_dim, num_classes, like)
        self.scorer.head = make_head(self.scorer.num_features, num_classes, like)
        self.evidence_proj = self._make_evidence_proj(num_classes, self.embed_dim, like)
        for module in (self.head, self.scorer.head, self.evidence_proj):
            module.train(self.training)  # new modules keep the model's train/eval mode
        if self.stage == 1:  # the new ViT-side layers are frozen in the scorer warm-up; nothing else changes
            for parameter in [*self.head.parameters(), *self.evidence_proj.parameters()]:
                parameter.requires_grad_(False)

    @staticmethod
    def _make_evidence_proj(num_classes: int, embed_dim: int, like: torch.Tensor | None = None) -> nn.Module:
        """Scorer class logits -> class-token offset, starting at zero (``nn.Identity``, unused, without classes)."""
        if num_classes <= 0:
            return nn.Identity()
        factory = {} if like is None else dict(device=like.device, dtype=like.dtype)
        projection = nn.Linear(num_classes, embed_dim, bias=False, **factory)
        nn.init.zeros_(projection.weight)
        return projection

    @torch.jit.ignore
    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the norm / heads when asked), as timm's ViT does."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices

    def _run_blocks(
        self, x: torch.Tensor, take_indices: list[int], norm: bool, output_fmt: str
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Score, select, run the blocks; return the last block's tokens and the ``take_indices`` outputs.

        Intermediates are the kept patch tokens put back on the patch grid, zeros where a patch was
        pruned: (B, C, H, W) for ``"NCHW"``, (B, N, C) for ``"NLC"``.
        """
        batch = x.shape[0]
        scores, scorer_logits, pooled = self.scorer(x)  # (B, N), (B, classes), (B, C_cnn)
        tokens = self.patch_embed(x) + self.pos_embed[:, 1:]  # (B, N, D), each with its position
        # (B, k, D) kept tokens, (B, k) their patch indices, (B, N) keep probabilities
        selected, kept_indices, keep_prob = self.selector(tokens, scores, self.num_kept, self.gumbel)
        cls = self.cls_token + self.pos_embed[:, :1] + self.context_proj(pooled)[:, None]  # (B, 1, D)
        if self.num_classes > 0:
            cls = cls + self.evidence_proj(scorer_logits)[:, None]  # (B, classes) -> (B, 1, D)
        x = torch.cat([cls.expand(batch, -1, -1), selected], dim=1)  # (B, k + 1, D)
        intermediates: list[torch.Tensor] = []
        for index, block in enumerate(self.blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x)
            else:
                x = block(x)
            if index in take_indices:
                kept = (self.norm(x) if norm else x)[:, 1:]  # (B, k, D)
                grid = kept.new_zeros(batch, tokens.shape[1], kept.shape[2])  # (B, N, D), pruned = 0
                grid = grid.scatter(1, kept_indices[:, :, None].expand(-1, -1, kept.shape[2]), kept)
                if output_fmt == "NCHW":
                    grid = grid.transpose(1, 2).unflatten(2, self.patch_embed.grid_size)  # (B, D, H, W)
                intermediates.append(grid)
        if not torch.jit.is_scripting():
            self._keep_loss_inputs(scorer_logits, keep_prob)
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, k + 1, D) tokens after the last block (class token first)."""
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
        """Block outputs on the patch grid (pruned patches are zeros), like timm's ViT ``forward_intermediates``.

        ``stop_early`` is accepted for timm's interface; the whole model always runs, so the final
        features equal ``forward_features``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, _ = feature_take_indices(len(self.blocks), indices)
        x, intermediates = self._run_blocks(x, take_indices, norm, output_fmt)
        return intermediates if intermediates_only else (self.norm(x), intermediates)

    @torch.jit.unused
    def _keep_loss_inputs(self, scorer_logits: torch.Tensor, keep_prob: torch.Tensor) -> None:
        """Keep what ``compute_loss`` needs from this pass (the CustomLoss protocol; eager only: TorchScript and FX skip this)."""
        if is_fx_tracing():
            return
        self._outputs = {"scorer_logits": scorer_logits, "keep_prob": keep_prob}

    @torch.jit.ignore
    def record_token_info(self, record: Any) -> list[torch.utils.hooks.RemovableHandle]:
        """Hooks that put the scorer's (B, N) ``scores`` and the (B, k) ``kept_indices`` into ``record.token_info``."""

        def keep_scores(module: nn.Module, args: tuple, output: tuple) -> None:
            record.token_info["scores"] = output[0].detach()

        def keep_indices(module: nn.Module, args: tuple, output: tuple) -> None:
            record.token_info["kept_indices"] = output[1].detach()

        return [self.scorer.register_forward_hook(keep_scores), self.selector.register_forward_hook(keep_indices)]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]  # class token
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # --- engine hooks ---------------------------------------------------------------------------

    def compute_loss(
        self, logits: torch.Tensor, target: torch.Tensor, criterion: nn.Module
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of the last forward pass (see module docstring); ``parts`` are detached, for logging.

        ``parts``: ``vit_ce``, ``scorer_ce``, ``budget`` (the keep-probability penalty), ``keep_rate``
        (mean ``sigmoid(score)``) and ``kept_fraction`` (``k / N``: patch tokens actually kept).
        """
        if not self._outputs:
            raise RuntimeError("compute_loss needs a forward pass first: call model(images) before it")
        vit_ce = criterion(logits, target)
        scorer_ce = criterion(self._outputs["scorer_logits"].float(), target)
        keep_rate = self._outputs["keep_prob"].mean()
        budget = (keep_rate - self.keep_ratio) ** 2
        if self.stage == 1:
            total = scorer_ce + self.efficiency_weight * budget
        else:
            total = vit_ce + self.aux_weight * scorer_ce + self.efficiency_weight * budget
        kept_fraction = keep_rate.new_tensor(self.num_kept / self._outputs["keep_prob"].shape[1])  # k / N
        parts = {
            "vit_ce": vit_ce, "scorer_ce": scorer_ce, "budget": budget, "keep_rate": keep_rate,
            "kept_fraction": kept_fraction,
        }
        return total, {name: value.detach() for name, value in parts.items()}

    def set_stage(self, stage: int) -> None:
        """Stage 1: train the scorer only (ViT frozen). Stage 2: train everything."""
        if stage not in (1, 2):
            raise ValueError(f"CNNPruneViT has stages 1 (scorer warm-up) and 2 (end to end); got {stage!r}")
        self.stage = stage
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(stage == 2 or name.startswith("scorer."))


def _load_vit_donor(model: CNNPruneViT, donor_name: str, file: str | None) -> None:
    """Copy the patch embedding, position embedding, class token, first blocks and norm of a DeiT."""
    prefixes = ("patch_embed.", "cls_token", "pos_embed", "norm.") + tuple(f"blocks.{i}." for i in range(len(model.blocks)))
    load_donor_weights(
        model,
        donor_name,
        file,
        donor_kwargs={"img_size": model.patch_embed.img_size, "patch_size": model.patch_embed.patch_size},
        prefixes=prefixes,
        file_argument="vit_pretrained_file",
        require_all=True,
    )


def _create_cnnprune_vit(
    variant: str, pretrained: bool = False, vit_donor: str = "", **kwargs: Any
) -> CNNPruneViT:
    vit_file = kwargs.pop("vit_pretrained_file", None)
    cnn_file = kwargs.pop("cnn_pretrained_file", None)
    # features_only=True: timm's FeatureGetterNet over forward_intermediates, the last 3 blocks by default
    feature_cfg = dict(out_indices=kwargs.pop("out_indices", 3), feature_cls="getter")
    if pretrained and names_own_weights(variant, kwargs):  # e.g. a folder of `histotoken export --format timm`
        return build_model_with_cfg(CNNPruneViT, variant, pretrained=True, feature_cfg=feature_cfg, **kwargs)
    model = build_model_with_cfg(
        CNNPruneViT,
        variant,
        pretrained=False,  # no weights of our own: the parts come from donors below
        feature_cfg=feature_cfg,
        cnn_pretrained=pretrained or cnn_file is not None,  # a file named in the spec is a file used
        cnn_pretrained_file=cnn_file,
        **kwargs,
    )
    if pretrained or vit_file is not None:
        _load_vit_donor(model, vit_donor, vit_file)
    return model


default_cfgs = generate_default_cfgs(
    {
        # fixed: the ViT's patch grid and position embeddings are built for img_size (build another size with img_size=)
        "cnnprune_vit_small.untrained": model_cfg("patch_embed.proj", fixed_input_size=True, license="apache-2.0"),
        "cnnprune_vit_tiny.untrained": model_cfg("patch_embed.proj", fixed_input_size=True, license="apache-2.0"),
    }
)


@register_model
def cnnprune_vit_small(pretrained: bool = False, **kwargs: Any) -> CNNPruneViT:
    """DeiT-Small (384 wide, 12 deep, 6 heads, 16 px patches) reading the top ``keep_ratio`` patches."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_cnnprune_vit(
        "cnnprune_vit_small", pretrained, vit_donor="deit_small_patch16_224", **dict(model_args, **kwargs)
    )


@register_model
def cnnprune_vit_tiny(pretrained: bool = False, **kwargs: Any) -> CNNPruneViT:
    """A 192-wide, 4-deep, 3-head ViT (DeiT-Tiny's first blocks when pretrained), for tests and CPU demos."""
    model_args = dict(patch_size=16, embed_dim=192, depth=4, num_heads=3)
    return _create_cnnprune_vit(
        "cnnprune_vit_tiny", pretrained, vit_donor="deit_tiny_patch16_224", **dict(model_args, **kwargs)
    )
