"""Bipartite soft matching, size-weighted merging and proportional attention, on built inputs."""

import pytest
import torch
import torch.nn.functional as F

from histotoken.layers.token_merging import (
    bipartite_soft_matching,
    max_merge_per_step,
    proportional_attention_bias,
)


def _merge(x, r, num_prefix_tokens=1, size=None, metric=None):
    merge = bipartite_soft_matching(x if metric is None else metric, r, num_prefix_tokens)
    return merge(x, size)


def test_merge_removes_r_tokens_and_conserves_size_and_mass():
    torch.manual_seed(0)
    x = torch.randn(3, 1 + 16, 8, dtype=torch.float64)
    size = torch.randint(1, 5, (3, 17, 1)).double()
    merged, new_size = _merge(x, 5, size=size)
    assert merged.shape == (3, 12, 8)
    assert new_size.shape == (3, 12, 1)
    # a size-weighted average conserves total size and the size-weighted sum of features
    torch.testing.assert_close(new_size.sum(dim=1), size.sum(dim=1))
    torch.testing.assert_close((merged * new_size).sum(dim=1), (x * size).sum(dim=1))


def test_class_token_is_never_merged_even_when_it_is_the_most_similar_token():
    # every token equals the class token: if the class token could be merged, it would be
    x = torch.ones(2, 1 + 8, 4)
    x[:, 1:] += 1e-3 * torch.randn(2, 8, 4)
    merged, size = _merge(x, 4)
    assert torch.equal(merged[:, 0], x[:, 0])
    assert torch.equal(size[:, 0], torch.ones(2, 1))


def test_distillation_and_class_tokens_stay_first_and_unmerged():
    torch.manual_seed(1)
    x = torch.randn(2, 2 + 10, 6)
    merged, size = _merge(x, 5, num_prefix_tokens=2)
    assert merged.shape[1] == 7
    assert torch.equal(merged[:, :2], x[:, :2])
    assert torch.equal(size[:, :2], torch.ones(2, 2, 1))


def test_size_weighted_average_on_a_hand_built_example():
    # class token at 0; B = positions 1, 3; A = positions 2, 4 (even positions of the whole sequence).
    # Token 2 points the same way as token 1, token 4 is orthogonal to both B tokens, so r = 1
    # merges token 2 into token 1.
    metric = torch.tensor([[[0.0, 0, 1], [1, 0.1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]])
    x = torch.tensor([[[9.0], [2.0], [10.0], [5.0], [7.0]]])
    size = torch.tensor([[[1.0], [1.0], [3.0], [2.0], [1.0]]])
    merged, new_size = _merge(x, 1, size=size, metric=metric)
    # order: class token, kept A token (4), then the B tokens (1 merged with 2, and 3)
    assert merged.flatten().tolist() == pytest.approx([9.0, 7.0, (3 * 10.0 + 1 * 2.0) / 4, 5.0])
    assert new_size.flatten().tolist() == [1.0, 1.0, 4.0, 2.0]


def test_two_tokens_merging_into_the_same_token_average_by_size():
    # B = 1, 3, 5; A = 2, 4: both A tokens are closest to token 1
    metric = torch.tensor([[[0.0, 0, 1], [1, 0.1, 0], [1, 0, 0], [0, 1, 0], [1, 0.05, 0], [0, 0, 1]]])
    x = torch.tensor([[[9.0], [2.0], [10.0], [5.0], [7.0], [4.0]]])
    size = torch.tensor([[[1.0], [1.0], [3.0], [1.0], [2.0], [1.0]]])
    merged, new_size = _merge(x, 2, size=size, metric=metric)
    expected = (3 * 10.0 + 1 * 2.0 + 2 * 7.0) / 6
    assert merged.flatten().tolist() == pytest.approx([9.0, expected, 5.0, 4.0])
    assert new_size.flatten().tolist() == [1.0, 6.0, 1.0, 1.0]


def test_without_prefix_tokens_the_sets_start_at_position_zero():
    # no prefix: A = 0, 2; B = 1, 3. Token 2 matches token 3 best; token 0 is orthogonal to both B.
    metric = torch.tensor([[[0.0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 1, 0.1]]])
    x = torch.tensor([[[1.0], [2.0], [3.0], [5.0]]])
    merged, new_size = _merge(x, 1, num_prefix_tokens=0, metric=metric)
    assert merged.flatten().tolist() == pytest.approx([1.0, 2.0, 4.0])
    assert new_size.flatten().tolist() == [1.0, 1.0, 2.0]


@pytest.mark.parametrize(("num_prefix", "num_patches"), [(1, 3), (2, 5), (1, 1), (2, 0)])
def test_r_is_clipped_so_the_prefix_and_one_token_remain(num_prefix, num_patches):
    x = torch.randn(1, num_prefix + num_patches, 4)
    merged, _ = _merge(x, 100, num_prefix_tokens=num_prefix)
    assert merged.shape[1] == num_prefix + num_patches - max_merge_per_step(
        num_prefix + num_patches, num_prefix
    )
    assert merged.shape[1] >= num_prefix + min(num_patches, 1)


def test_r_zero_returns_the_input_unchanged():
    x = torch.randn(2, 9, 4)
    merged, size = _merge(x, 0)
    assert merged is x
    assert torch.equal(size, torch.ones(2, 9, 1))


def test_gradient_reaches_every_token_with_its_share():
    metric = torch.tensor([[[0.0, 0, 1], [1, 0.1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]], dtype=torch.float64)
    x = torch.randn(1, 5, 2, dtype=torch.float64, requires_grad=True)
    size = torch.tensor([[[1.0], [1.0], [3.0], [2.0], [1.0]]], dtype=torch.float64)
    merged, _ = _merge(x, 1, size=size, metric=metric)
    merged.sum().backward()
    # token 2 (size 3) and token 1 (size 1) become one token: d/dx = 3/4 and 1/4
    assert x.grad[0, :, 0].tolist() == pytest.approx([1.0, 0.25, 0.75, 1.0, 1.0])


def test_proportional_attention_equals_attention_over_repeated_tokens():
    torch.manual_seed(2)
    q = torch.randn(1, 2, 3, 4)  # (B, heads, N, head_dim)
    keys = torch.randn(1, 2, 3, 4)
    values = torch.randn(1, 2, 3, 4)
    size = torch.tensor([[[2.0], [1.0], [3.0]]])  # key 0 stands for 2 tokens, key 2 for 3
    bias = proportional_attention_bias(size)
    assert bias.shape == (1, 1, 1, 3)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias)
    repeat = torch.tensor([0, 0, 1, 2, 2, 2])
    expected = F.scaled_dot_product_attention(q, keys[:, :, repeat], values[:, :, repeat])
    torch.testing.assert_close(out, expected)


def test_bias_takes_the_requested_dtype():
    bias = proportional_attention_bias(torch.ones(2, 5, 1), torch.bfloat16)
    assert bias.dtype == torch.bfloat16
    assert torch.equal(bias, torch.zeros(2, 1, 1, 5, dtype=torch.bfloat16))
