"""Reference values from scikit-learn, and random cases to compare against them (shared by the metric tests)."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score


def sklearn_metrics(y_true, y_pred) -> dict[str, float]:
    with warnings.catch_warnings():  # classes only predicted: sklearn warns, then counts them as it documents
        warnings.simplefilter("ignore")
        return {
            "accuracy": accuracy_score(y_true, y_pred),
            "balanced_accuracy": balanced_accuracy_score(y_true, y_pred),
            "macro_f1": f1_score(y_true, y_pred, average="macro", zero_division=0),
        }


def random_labels(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """2-60 images of 1-8 classes, often with classes missing from the labels or the predictions."""
    num_classes = int(rng.integers(1, 9))
    n = int(rng.integers(2, 61))
    label_classes = rng.choice(num_classes, size=int(rng.integers(1, num_classes + 1)), replace=False)
    pred_classes = rng.choice(num_classes, size=int(rng.integers(1, num_classes + 1)), replace=False)
    y_true = rng.choice(label_classes, n)
    y_pred = np.where(rng.random(n) < rng.random(), y_true, rng.choice(pred_classes, n))
    return y_true, y_pred, num_classes
