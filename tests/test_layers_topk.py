"""Top-k token selection: hard at inference, straight-through gradient in training."""

import pytest
import torch

from histotoken.layers.topk import select_topk_tokens


def _inputs(batch=3, tokens=10, channels=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, channels, generator=generator), torch.randn(
        batch, tokens, generator=generator
    )


def test_inference_keeps_the_k_highest_scores_in_raster_order():
    tokens, scores = _inputs()
    selected, indices, keep_prob = select_topk_tokens(tokens, scores, 4, training=False)
    assert selected.shape == (3, 4, 4)
    for row in range(3):
        expected = set(scores[row].argsort(descending=True)[:4].tolist())
        assert set(indices[row].tolist()) == expected
        assert indices[row].tolist() == sorted(indices[row].tolist())
        assert torch.equal(selected[row], tokens[row, indices[row]])
    torch.testing.assert_close(keep_prob, scores.sigmoid())


def test_training_passes_gradient_to_the_scores_of_kept_tokens():
    tokens, scores = _inputs()
    scores.requires_grad_(True)
    selected, indices, _ = select_topk_tokens(tokens, scores, 4, training=True, gumbel=False)
    # forward values are the hard selection, unchanged by the straight-through gate
    assert torch.equal(selected, torch.stack([tokens[row, indices[row]] for row in range(3)]))
    selected.sum().backward()
    kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, indices, True)
    assert (scores.grad[kept] != 0).all()
    assert (scores.grad[~kept] == 0).all()
    # d/ds of sigmoid(s) * sum(token) at the kept tokens
    sigmoid = scores.detach().sigmoid()
    expected = sigmoid * (1 - sigmoid) * tokens.sum(-1)
    torch.testing.assert_close(scores.grad[kept], expected[kept])


def test_no_gradient_path_at_inference():
    tokens, scores = _inputs()
    scores.requires_grad_(True)
    selected, _, _ = select_topk_tokens(tokens, scores, 4, training=False)
    assert not selected.requires_grad


def test_gumbel_exploration_sometimes_picks_lower_ranked_tokens():
    tokens, scores = _inputs(batch=1, tokens=12)
    deterministic = set(select_topk_tokens(tokens, scores, 3, training=False)[1][0].tolist())
    generator = torch.Generator().manual_seed(0)
    draws = [
        set(select_topk_tokens(tokens, scores, 3, training=True, generator=generator)[1][0].tolist())
        for _ in range(20)
    ]
    assert any(draw != deterministic for draw in draws)
    # with large score gaps the noise cannot change the choice
    gaps = torch.arange(12.0)[None] * 100
    picks = select_topk_tokens(tokens, gaps, 3, training=True, generator=generator)[1]
    assert picks[0].tolist() == [9, 10, 11]


def test_kept_tokens_carry_their_own_position_embeddings():
    positions = torch.arange(10.0)[None, :, None].expand(2, 10, 3)  # position i written into token i
    content = torch.zeros(2, 10, 3)
    scores = torch.randn(2, 10, generator=torch.Generator().manual_seed(3))
    selected, indices, _ = select_topk_tokens(content + positions, scores, 5, training=True)
    assert torch.equal(selected[..., 0], indices.float())


@pytest.mark.parametrize("k", [0, 11])
def test_k_out_of_range_is_an_error(k):
    tokens, scores = _inputs()
    with pytest.raises(ValueError, match="k="):
        select_topk_tokens(tokens, scores, k, training=False)
