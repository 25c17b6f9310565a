"""TokenLearner and TokenFuser: learn a few tokens from a grid of many, and map them back.

Paper: Ryoo, Piergiovanni, Arnab, Dehghani, Angelova, "TokenLearner: What Can 8 Learned Tokens
Do for Images and Videos?", NeurIPS 2021 (https://arxiv.org/abs/2106.11297).

TokenLearner computes S spatial attention maps from the input and pools the input with each
map, so S learned tokens replace the N = H * W grid tokens:

    z_i = sum_n a_i(x)[n] * x[n],    i = 1..S

- ``TokenLearner`` is the v1.1 form: LayerNorm over channels, an MLP over channels gives S
  logits per position, softmax over the N positions gives the maps (each sums to 1). The MLP has
  a narrow hidden layer (``hidden_dim=64``): it only has to produce S logits, and a hidden layer
  as wide as the tokens (384) made the learner about 15x slower on CPU (bf16, 14 x 14 grid).
- ``TokenLearnerConv`` is the v1 form: a stack of 3x3 convolutions on the (C, H, W) grid gives S
  maps, a sigmoid gates every position and the gated grid is average-pooled (``gate="sigmoid"``,
  as in the paper), or a softmax over positions gives a weighted sum (``gate="softmax"``).
- ``TokenFuser`` maps S tokens back to N: a linear layer mixes the S tokens, and every position
  takes a sigmoid-gated sum of them, the gates computed by an MLP from that position's original
  token. The caller adds the result to the original tokens (residual).

All modules take tokens ``(B, N, C)`` plus ``grid_size=(H, W)``, or a feature map ``(B, C, H, W)``,
and return ``(tokens (B, S, C), pooling weights (B, S, N))``. The weights are the ones actually
used for the weighted sum, so ``tokens == weights @ x`` holds for every learner.
"""

import torch
from timm.layers import register_notrace_function
from torch import nn


@register_notrace_function  # shape-dependent branches: one opaque call in an FX graph
def as_tokens(x: torch.Tensor, grid_size: tuple[int, int] | None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Return ``x`` as tokens (B, N, C) and the grid (H, W) they come from.

    ``x`` is either a feature map (B, C, H, W) or tokens (B, N, C); tokens need ``grid_size`` unless
    N is a perfect square. Written so that TorchScript compiles it (shapes indexed one by one,
    messages without ``tuple(shape)``).
    """
    if x.dim() == 4:
        height, width = int(x.shape[2]), int(x.shape[3])
        return x.flatten(2).transpose(1, 2), (height, width)  # (B, C, H, W) -> (B, N, C)
    if x.dim() != 3:
        raise ValueError(f"expected tokens (B, N, C) or a feature map (B, C, H, W), got shape {list(x.shape)}")
    num_positions = int(x.shape[1])
    if grid_size is None:
        side = int(round(num_positions**0.5))
        if side * side != num_positions:
            raise ValueError(f"{num_positions} tokens are not a square grid; pass grid_size=(H, W)")
        return x, (side, side)
    height, width = int(grid_size[0]), int(grid_size[1])
    if height * width != num_positions:
        raise ValueError(f"grid_size ({height}, {width}) does not match {num_positions} tokens")
    return x, (height, width)


class TokenLearner(nn.Module):
    """TokenLearner v1.1: per-position MLP logits, softmax over positions, weighted sum."""

    def __init__(
        self,
        dim: int,
        num_tokens: int = 8,
        hidden_dim: int = 64,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be at least 1, got {num_tokens}")
        self.num_tokens = num_tokens
        self.norm = norm_layer(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, num_tokens)

    def forward(
        self, x: torch.Tensor, grid_size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = as_tokens(x, grid_size)
        logits = self.fc2(self.act(self.fc1(self.norm(x))))  # (B, N, C) -> (B, N, S)
        # Softmax in fp32, so that each map sums to 1 also under bf16 autocast.
        weights = logits.transpose(1, 2).float().softmax(dim=-1).to(x.dtype)  # (B, N, S) -> (B, S, N)
        tokens = weights @ x  # (B, S, N) @ (B, N, C) -> (B, S, C)
        return tokens, weights


class TokenLearnerConv(nn.Module):
    """TokenLearner v1: 3x3 convolutions on the grid give S maps; gate and pool the grid with each."""

    def __init__(
        self,
        dim: int,
        num_tokens: int = 8,
        num_convs: int = 3,
        kernel_size: int = 3,
        gate: str = "sigmoid",
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be at least 1, got {num_tokens}")
        if gate not in ("sigmoid", "softmax"):
            raise ValueError(f"gate must be 'sigmoid' (paper v1) or 'softmax', got {gate!r}")
        if num_convs < 1 or kernel_size % 2 == 0:
            raise ValueError(f"need num_convs >= 1 and an odd kernel_size, got {num_convs}, {kernel_size}")
        self.num_tokens = num_tokens
        self.gate = gate
        self.norm = norm_layer(dim)
        layers: list[nn.Module] = []
        in_channels = dim
        for index in range(num_convs):
            # S channels after the first conv (our choice): the maps stay cheap next to the C-channel grid.
            layers.append(nn.Conv2d(in_channels, num_tokens, kernel_size, padding=kernel_size // 2))
            if index < num_convs - 1:
                layers.append(act_layer())
            in_channels = num_tokens
        self.convs = nn.Sequential(*layers)

    def forward(
        self, x: torch.Tensor, grid_size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, (height, width) = as_tokens(x, grid_size)
        batch, num_positions, channels = x.shape
        grid = self.norm(x).transpose(1, 2).reshape(batch, channels, height, width)  # (B, N, C) -> (B, C, H, W)
        logits = self.convs(grid).flatten(2)  # (B, C, H, W) -> (B, S, H, W) -> (B, S, N)
        if self.gate == "sigmoid":
            # Gate every position, then average over positions: weights sigmoid / N.
            weights = torch.sigmoid(logits) / num_positions  # (B, S, N)
        else:
            weights = logits.float().softmax(dim=-1).to(x.dtype)  # (B, S, N), sums to 1 over N
        tokens = weights @ x  # (B, S, N) @ (B, N, C) -> (B, S, C)
        return tokens, weights


class TokenFuser(nn.Module):
    """Map S learned tokens back to the N positions of the original grid.

    Returns the fused tokens only; add them to ``original`` for the paper's residual connection.
    """

    def __init__(
        self,
        dim: int,
        num_tokens: int = 8,
        hidden_dim: int = 64,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.norm_tokens = norm_layer(dim)
        self.mix_tokens = nn.Linear(num_tokens, num_tokens)  # a linear layer over the token axis
        self.norm_original = norm_layer(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, num_tokens)

    def forward(self, tokens: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] != self.num_tokens:
            raise ValueError(f"TokenFuser was built for {self.num_tokens} tokens, got {tokens.shape[1]}")
        mixed = self.norm_tokens(tokens).transpose(1, 2)  # (B, S, C) -> (B, C, S)
        mixed = self.mix_tokens(mixed).transpose(1, 2)  # (B, C, S) -> (B, C, S) -> (B, S, C)
        gates = self.fc2(self.act(self.fc1(self.norm_original(original))))  # (B, N, C) -> (B, N, S)
        return torch.sigmoid(gates) @ mixed  # (B, N, S) @ (B, S, C) -> (B, N, C)
