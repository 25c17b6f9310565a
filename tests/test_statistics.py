"""Statistics on constructed predictions whose answers are known (or checked against scikit-learn/scipy)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from histotoken.reporting import statistics as st

SKLEARN = {
    "accuracy": accuracy_score,
    "balanced_accuracy": balanced_accuracy_score,
    "macro_f1": lambda t, p: f1_score(t, p, average="macro"),
}


def random_predictions(rng, n_patients=12, per_patient=5, num_classes=4, skill=0.6, prefix="p"):
    patients = np.repeat([f"{prefix}{i}" for i in range(n_patients)], per_patient)
    y_true = np.repeat(rng.integers(0, num_classes, n_patients), per_patient)
    right = rng.random(len(y_true)) < skill
    y_pred = np.where(right, y_true, rng.integers(0, num_classes, len(y_true)))
    paths = np.asarray([f"img{i}.png" for i in range(len(y_true))])
    return st.Predictions(y_true, y_pred, patients, paths)


def test_metric_values_equal_scikit_learn():
    predictions = random_predictions(np.random.default_rng(0))
    values = st.metric_values(predictions, num_classes=4)
    for name, function in SKLEARN.items():
        assert values[name] == pytest.approx(function(predictions.y_true, predictions.y_pred))


@pytest.mark.parametrize("stratified", [False, True])
def test_each_patient_resample_equals_scikit_learn_on_the_drawn_images(stratified):
    predictions = random_predictions(np.random.default_rng(1), per_patient=3)
    unique = np.unique(predictions.patients)
    strata = st.patient_classes([predictions], unique) if stratified else None
    unique, draws = st.patient_draws(predictions.patients, 20, np.random.default_rng(2), strata)
    index = st.image_index(predictions.patients, unique, draws)
    values = st.resampled_metrics(predictions, unique, draws, num_classes=4)
    for row in range(20):
        rows = index[row][index[row] >= 0]
        assert len(rows) == 3 * len(unique)  # whole patients, all of their images
        for name, function in SKLEARN.items():
            expected = function(predictions.y_true[rows], predictions.y_pred[rows])
            assert values[name][row] == pytest.approx(expected)


def test_stratified_draws_keep_each_class_s_number_of_patients():
    predictions = random_predictions(np.random.default_rng(9), n_patients=16)
    unique = np.unique(predictions.patients)
    classes = st.patient_classes([predictions], unique)
    _, draws = st.patient_draws(predictions.patients, 50, np.random.default_rng(3), classes)
    for draw in draws:
        assert sorted(classes[draw]) == sorted(classes)


def test_a_class_with_a_single_test_patient_turns_stratification_off():
    one_each = st.Predictions(np.arange(4), np.arange(4), np.asarray(["a", "b", "c", "d"]))
    assert st.class_strata([one_each], np.unique(one_each.patients)) is None
    two_each = st.Predictions(np.repeat(np.arange(2), 2), np.zeros(4, int), np.asarray(["a", "b", "c", "d"]))
    assert list(st.class_strata([two_each], np.unique(two_each.patients))) == [0, 0, 1, 1]


def test_a_pooled_interval_with_two_test_patients_per_class_still_contains_the_mean():
    # Unstratified patient resampling would drop whole classes and pull macro-F1 far below its value.
    rng = np.random.default_rng(10)
    folds = []
    for fold in range(2):
        y_true = np.repeat(np.arange(8), 6)
        y_pred = np.where(rng.random(48) < 0.7, y_true, rng.integers(0, 8, 48))
        folds.append(st.Predictions(y_true, y_pred, np.repeat([f"f{fold}p{k}" for k in range(16)], 3)))
    pooled = st.pooled_interval(folds, num_classes=8, n_resamples=300)["macro_f1"]
    assert pooled.low < pooled.mean < pooled.high


def test_identical_models_differ_by_zero_with_an_interval_covering_zero():
    model = random_predictions(np.random.default_rng(3))
    differences = st.paired_difference([(model, model)], num_classes=4, n_resamples=200)
    for difference in differences.values():
        assert difference.difference == 0
        assert difference.low <= 0 <= difference.high
        assert difference.share_a_better == 0
        assert not st.is_resolved(difference.low, difference.high)
    assert differences["accuracy"].mcnemar_p == 1.0


def test_a_model_better_on_every_patient_has_an_interval_above_zero():
    rng = np.random.default_rng(4)
    perfect = random_predictions(rng, skill=1.0)
    worse_pred = perfect.y_pred.copy()
    worse_pred[::5] = (worse_pred[::5] + 1) % 4  # one wrong image in each patient's five
    worse = st.Predictions(perfect.y_true, worse_pred, perfect.patients, perfect.paths)
    differences = st.paired_difference([(perfect, worse)], num_classes=4, n_resamples=300)
    for difference in differences.values():
        assert difference.low > 0 and difference.difference > 0
        assert difference.share_a_better == 1.0
        assert st.is_resolved(difference.low, difference.high)
    assert differences["accuracy"].difference == pytest.approx(0.2)
    # and the other way round, below zero
    reverse = st.paired_difference([(worse, perfect)], num_classes=4, n_resamples=300)
    assert reverse["macro_f1"].high < 0 and reverse["macro_f1"].share_a_better == 0


def test_mcnemar_matches_a_hand_computed_binomial_case():
    # 1 vs 9 discordant pairs: p = 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * (1 + 10) / 1024
    assert st.mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert st.mcnemar_exact(9, 1) == pytest.approx(22 / 1024)
    assert st.mcnemar_exact(0, 0) == 1.0


def test_paired_accuracy_counts_the_discordant_images_for_mcnemar():
    y_true = np.zeros(20, dtype=int)
    patients = np.repeat([f"p{i}" for i in range(5)], 4)
    a_pred = np.zeros(20, dtype=int)
    b_pred = np.zeros(20, dtype=int)
    a_pred[0] = 1  # only A wrong on image 0
    b_pred[1:10] = 1  # only B wrong on images 1-9
    a = st.Predictions(y_true, a_pred, patients)
    b = st.Predictions(y_true, b_pred, patients)
    accuracy = st.paired_difference([(a, b)], num_classes=2, n_resamples=50)["accuracy"]
    assert (accuracy.a_only_correct, accuracy.b_only_correct) == (9, 1)
    assert accuracy.mcnemar_p == pytest.approx(22 / 1024)
    assert accuracy.difference == pytest.approx(19 / 20 - 11 / 20)


def test_pooled_interval_covers_the_mean_of_folds_and_reports_their_spread():
    rng = np.random.default_rng(5)
    folds = [random_predictions(rng, skill=skill, prefix=f"f{k}") for k, skill in enumerate((0.3, 0.6, 0.9))]
    pooled = st.pooled_interval(folds, num_classes=4, n_resamples=400)
    for name, function in SKLEARN.items():
        per_fold = [function(f.y_true, f.y_pred) for f in folds]
        spread = pooled[name]
        assert spread.mean == pytest.approx(np.mean(per_fold))
        assert spread.sd == pytest.approx(np.std(per_fold, ddof=1))
        assert spread.n == 3
        assert spread.low <= spread.mean <= spread.high
        # an interval of the mean over folds: narrower than the range of the fold values here
        assert spread.high - spread.low < max(per_fold) - min(per_fold)


def test_seed_spread_of_one_value_has_no_standard_deviation():
    spread = st.seed_spread([0.7])
    assert spread.mean == 0.7 and np.isnan(spread.sd) and spread.n == 1


def test_a_cross_magnification_pair_shares_patients_but_not_images_and_has_no_mcnemar():
    rng = np.random.default_rng(6)
    at_100 = random_predictions(rng, skill=0.9, prefix="p")
    at_400 = random_predictions(rng, per_patient=3, skill=0.9, prefix="p")
    difference = st.paired_difference([(at_100, at_400)], num_classes=4, n_resamples=100)["accuracy"]
    assert difference.mcnemar_p is None
    assert difference.low <= difference.difference <= difference.high
    disjoint = random_predictions(rng, prefix="q")
    with pytest.raises(ValueError, match="share no test patient"):
        st.paired_difference([(at_100, disjoint)], num_classes=4)


def test_align_puts_two_prediction_sets_in_one_image_order():
    a = random_predictions(np.random.default_rng(7))
    order = np.random.default_rng(8).permutation(len(a.y_true))[:-3]
    b = st.Predictions(a.y_true[order], a.y_pred[order], a.patients[order], a.paths[order])
    left, right = st.align(a, b)
    assert list(left.paths) == list(right.paths) and len(left.paths) == len(a.paths) - 3
    assert np.array_equal(left.y_pred, right.y_pred)


def test_predictions_are_read_from_a_run_folder(tmp_path):
    frame = pd.DataFrame({
        "path": ["a.png", "b.png"], "patient_id": ["14-1", "14-2"], "target": [0, 1], "prediction": [0, 0],
        "prob/benign": [0.9, 0.6], "prob/malignant": [0.1, 0.4],
    })
    (tmp_path / "eval").mkdir()
    frame.to_csv(tmp_path / "eval" / "100.predictions.csv", index=False)
    predictions = st.read_predictions(tmp_path, "100")
    assert list(predictions.patients) == ["14-1", "14-2"] and list(predictions.correct) == [True, False]
    assert st.num_classes_of(tmp_path / "eval" / "100.predictions.csv") == 2
    assert st.read_predictions(tmp_path, "400") is None
