"""Headline metrics equal scikit-learn's on random image sets and inside bootstrap resamples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from histotoken.engine.evaluate import compute_metrics
from histotoken.engine.metrics import headline_metrics
from tests.sklearn_reference import random_labels, sklearn_metrics

random_case = random_labels


def test_the_issue_example_gives_sklearn_balanced_accuracy():
    # class 2 is predicted once but never a label: sklearn gives (2/3 + 1) / 2, not (2/3 + 1 + 0) / 3
    result = headline_metrics(torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 2, 1, 1, 1]), 3)
    assert float(result["balanced_accuracy"][0]) == pytest.approx(0.8333333)
    assert float(result["balanced_accuracy"][0]) == pytest.approx(
        balanced_accuracy_score([0, 0, 0, 1, 1, 1], [0, 0, 2, 1, 1, 1])
    )


@pytest.mark.parametrize("seed", range(250))
def test_headline_metrics_equal_sklearn_on_random_cases(seed):
    y_true, y_pred, num_classes = random_case(np.random.default_rng(seed))
    ours = {k: float(v[0]) for k, v in headline_metrics(torch.as_tensor(y_true), torch.as_tensor(y_pred), num_classes).items()}
    assert ours == pytest.approx(sklearn_metrics(y_true, y_pred), abs=1e-6)


@pytest.mark.parametrize(
    "y_true, y_pred",
    [
        ([1, 1, 1], [1, 1, 1]),  # a single class, all correct
        ([1, 1, 1], [0, 2, 1]),  # a single class in the labels, others predicted
        ([0, 1], [1, 0]),  # two images, both wrong
        ([3, 3], [3, 3]),  # two images of the last class
    ],
)
def test_headline_metrics_equal_sklearn_on_edge_cases(y_true, y_pred):
    ours = {k: float(v[0]) for k, v in headline_metrics(torch.tensor(y_true), torch.tensor(y_pred), 4).items()}
    assert ours == pytest.approx(sklearn_metrics(y_true, y_pred), abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_padded_rows_of_the_torch_front_equal_sklearn_on_each_row(seed):
    rng = np.random.default_rng(100 + seed)
    cases = [random_case(rng) for _ in range(4)]
    num_classes = max(case[2] for case in cases)
    width = max(len(case[0]) for case in cases)
    truth = torch.full((4, width), -1)
    predicted = torch.zeros((4, width), dtype=torch.long)
    for row, (y_true, y_pred, _) in enumerate(cases):
        truth[row, : len(y_true)] = torch.as_tensor(y_true)
        predicted[row, : len(y_pred)] = torch.as_tensor(y_pred)
    batch = headline_metrics(truth, predicted, num_classes)
    for row, (y_true, y_pred, _) in enumerate(cases):
        assert {k: float(v[row]) for k, v in batch.items()} == pytest.approx(sklearn_metrics(y_true, y_pred), abs=1e-6)


def test_bootstrap_zero_gives_no_intervals():
    result = compute_metrics([0, 1, 1, 0], [0, 1, 0, 0], ["a", "a", "b", "b"], ["x", "y"], n_bootstrap=0)
    assert result["ci95"] is None
    assert result["n_bootstrap"] == 0
