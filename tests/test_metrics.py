import numpy as np
import pytest

from histotoken.engine.evaluate import compute_metrics

# Hand-built case, 3 classes, two patients (A: 3 images, B: 7 images).
#            predicted 0  1  2
# true 0:             3  1  0
# true 1:             0  2  1
# true 2:             1  0  2
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
Y_PRED = [0, 0, 0, 1, 1, 1, 2, 2, 2, 0]
PATIENTS = ["A"] * 3 + ["B"] * 7
NAMES = ["benign_a", "benign_b", "malignant"]


def test_metrics_match_the_hand_built_confusion():
    result = compute_metrics(Y_TRUE, Y_PRED, PATIENTS, NAMES, n_bootstrap=0)
    assert result["confusion_matrix"] == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    assert result["accuracy"] == pytest.approx(0.7)
    recalls = [3 / 4, 2 / 3, 2 / 3]
    assert result["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    precisions = [3 / 4, 2 / 3, 2 / 3]
    f1 = [2 * p * r / (p + r) for p, r in zip(precisions, recalls)]
    assert result["macro_f1"] == pytest.approx(np.mean(f1))
    assert result["per_class"]["benign_a"] == pytest.approx(
        {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4}
    )
    # patient A: 3/3 correct, patient B: 4/7 correct -> mean of the two rates
    assert result["patient_accuracy"] == pytest.approx((1.0 + 4 / 7) / 2)
    assert (result["n_images"], result["n_patients"]) == (10, 2)


def test_bootstrap_interval_brackets_the_estimate_and_is_reproducible():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 300)
    y_pred = np.where(rng.random(300) < 0.7, y_true, rng.integers(0, 4, 300))
    patients = [f"p{i % 30}" for i in range(300)]
    first = compute_metrics(y_true, y_pred, patients, list("abcd"), n_bootstrap=300, seed=1)
    second = compute_metrics(y_true, y_pred, patients, list("abcd"), n_bootstrap=300, seed=1)
    assert first["ci95"] == second["ci95"]
    for name in ("accuracy", "balanced_accuracy", "macro_f1"):
        low, high = first["ci95"][name]
        assert low < first[name] < high
        assert high - low < 0.3


def test_absent_class_does_not_drag_macro_f1_down():
    # Only classes 0 and 1 occur; the third class is neither true nor predicted.
    result = compute_metrics([0, 0, 1, 1], [0, 0, 1, 1], ["A", "A", "B", "B"], NAMES, n_bootstrap=0)
    assert result["macro_f1"] == pytest.approx(1.0)
    assert result["per_class"]["malignant"]["support"] == 0
