"""TokenLearner (v1.1 and convolutional v1) and TokenFuser as plain modules."""

from __future__ import annotations

import pytest
import torch

from histotoken.layers.tokenlearner import TokenFuser, TokenLearner, TokenLearnerConv, as_tokens

B, H, W, C, S = 2, 4, 6, 16, 5
N = H * W


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, N, C, generator=torch.Generator().manual_seed(seed))


LEARNERS = {
    "v11": lambda: TokenLearner(C, num_tokens=S),
    "conv_sigmoid": lambda: TokenLearnerConv(C, num_tokens=S, gate="sigmoid"),
    "conv_softmax": lambda: TokenLearnerConv(C, num_tokens=S, gate="softmax"),
}


@pytest.mark.parametrize("kind", sorted(LEARNERS))
def test_learner_returns_s_tokens_and_one_map_per_token(kind):
    torch.manual_seed(0)
    learned, weights = LEARNERS[kind]()(tokens(), (H, W))
    assert learned.shape == (B, S, C)
    assert weights.shape == (B, S, N)


@pytest.mark.parametrize("kind", sorted(LEARNERS))
def test_learned_tokens_are_the_weighted_sums_the_maps_describe(kind):
    torch.manual_seed(0)
    x = tokens()
    learned, weights = LEARNERS[kind]()(x, (H, W))
    expected = torch.einsum("bsn,bnc->bsc", weights, x)
    torch.testing.assert_close(learned, expected)


@pytest.mark.parametrize("kind", ["v11", "conv_softmax"])
def test_softmax_maps_sum_to_one_over_positions(kind):
    torch.manual_seed(0)
    _, weights = LEARNERS[kind]()(tokens(), (H, W))
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(B, S))


def test_v11_maps_still_sum_to_one_under_bf16_autocast():
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, weights = TokenLearner(C, num_tokens=S)(tokens(), (H, W))
    torch.testing.assert_close(weights.float().sum(dim=-1), torch.ones(B, S), atol=1e-3, rtol=0)


def test_sigmoid_gate_averages_gated_positions():
    torch.manual_seed(0)
    _, weights = TokenLearnerConv(C, num_tokens=S, gate="sigmoid")(tokens(), (H, W))
    # sigmoid in (0, 1), then a mean over N positions: every weight lies in (0, 1 / N)
    assert (weights > 0).all() and (weights < 1 / N).all()


def test_v11_learner_does_not_depend_on_the_order_of_positions():
    torch.manual_seed(0)
    learner = TokenLearner(C, num_tokens=S)
    x = tokens()
    permutation = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    learned, weights = learner(x, (H, W))
    learned_permuted, weights_permuted = learner(x[:, permutation], (H, W))
    torch.testing.assert_close(learned_permuted, learned)
    torch.testing.assert_close(weights_permuted, weights[:, :, permutation])


@pytest.mark.parametrize("kind", sorted(LEARNERS))
def test_feature_map_input_equals_token_input(kind):
    torch.manual_seed(0)
    learner = LEARNERS[kind]()
    x = tokens()
    feature_map = x.transpose(1, 2).reshape(B, C, H, W)
    from_tokens = learner(x, (H, W))
    from_map = learner(feature_map)
    torch.testing.assert_close(from_map[0], from_tokens[0])
    torch.testing.assert_close(from_map[1], from_tokens[1])


def test_tokens_need_a_grid_unless_square():
    assert as_tokens(torch.zeros(1, 9, C), None)[1] == (3, 3)
    with pytest.raises(ValueError, match="grid_size"):
        as_tokens(torch.zeros(1, N, C), None)
    with pytest.raises(ValueError, match="does not match"):
        as_tokens(torch.zeros(1, N, C), (5, 5))


def test_conv_learner_uses_the_spatial_layout():
    # Unlike v1.1, the convolutions see neighbours: the same tokens on another grid give other maps.
    torch.manual_seed(0)
    learner = TokenLearnerConv(C, num_tokens=S, gate="softmax")
    x = tokens()
    _, weights_4x6 = learner(x, (4, 6))
    _, weights_6x4 = learner(x, (6, 4))
    assert not torch.allclose(weights_4x6, weights_6x4)


def test_fuser_maps_s_tokens_back_to_n_positions():
    torch.manual_seed(0)
    fuser = TokenFuser(C, num_tokens=S)
    learned = torch.randn(B, S, C)
    fused = fuser(learned, tokens())
    assert fused.shape == (B, N, C)
    with pytest.raises(ValueError, match="built for 5 tokens"):
        fuser(torch.randn(B, S + 1, C), tokens())


def test_fuser_output_at_a_position_follows_that_positions_original_token():
    torch.manual_seed(0)
    fuser = TokenFuser(C, num_tokens=S)
    learned = torch.randn(B, S, C)
    original = tokens()
    permutation = torch.randperm(N, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(fuser(learned, original[:, permutation]), fuser(learned, original)[:, permutation])


@pytest.mark.parametrize("kind", sorted(LEARNERS))
def test_gradients_reach_learner_fuser_parameters_and_input(kind):
    torch.manual_seed(0)
    learner = LEARNERS[kind]()
    fuser = TokenFuser(C, num_tokens=S)
    x = tokens().requires_grad_()
    learned, _ = learner(x, (H, W))
    fuser(learned, x).square().mean().backward()
    for name, parameter in [*learner.named_parameters(), *fuser.named_parameters()]:
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="num_tokens"):
        TokenLearner(C, num_tokens=0)
    with pytest.raises(ValueError, match="gate"):
        TokenLearnerConv(C, gate="relu")
    with pytest.raises(ValueError, match="odd kernel_size"):
        TokenLearnerConv(C, kernel_size=4)
