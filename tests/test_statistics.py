"""Statistics on constructed predictions whose answers are known (or checked against scikit-learn/scipy)."""

from __future__ import annotations

import re

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


def test_the_report_reads_its_statistics_from_the_one_stats_module():
    from histotoken import stats

    assert st.pooled_interval is stats.pooled_interval and st.paired_difference is stats.paired_difference


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


# --------------------------------------------------------------------------- the report's Statistics section


@pytest.fixture(scope="module")
def two_seed_study(tmp_path_factory):
    import yaml

    from tests.study_fixture import write_study

    study = write_study(tmp_path_factory.mktemp("two_seeds"), seeds=(0, 1), with_images=False)
    spec = yaml.safe_load((study / "spec.yaml").read_text())
    spec["protocol"]["bootstrap"] = 200  # resamples per comparison: enough for the checks, quick
    spec["reference_model"] = "deit_small_patch16_224"
    (study / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return study


def statistics_markdown(study) -> str:
    from histotoken.reporting.blocks import Section
    from histotoken.reporting.render import render_markdown
    from histotoken.reporting.sections import SectionContext
    from histotoken.reporting.sections import statistics as section
    from histotoken.reporting.study import load_study

    blocks = section.build(SectionContext(load_study(study)))
    return render_markdown("t", [Section("statistics", "Statistics", blocks)], None)


@pytest.fixture(scope="module")
def two_seed_markdown(two_seed_study):
    return statistics_markdown(two_seed_study)


def test_every_verdict_in_the_statistics_tables_has_an_interval_excluding_zero(two_seed_markdown):
    number = r"([+-]\d\.\d+)"
    rows = re.findall(rf"\| {number} \[{number}, {number}\] \|[^\n]*\| ([^|]+) \|\n", two_seed_markdown)
    verdicts = [(float(low), float(high), verdict.strip()) for _, low, high, verdict in rows]
    claims = [(low, high) for low, high, verdict in verdicts if verdict.endswith(" ahead")]
    unresolved = [(low, high) for low, high, verdict in verdicts if verdict == "not resolved at this sample size"]
    assert claims and unresolved and len(claims) + len(unresolved) == len(verdicts)  # the fixture has both kinds
    for low, high in claims:
        assert low > 0 or high < 0
    for low, high in unresolved:
        assert low <= 0 <= high


def test_asymmetry_row_pairs_train_400_test_100_with_train_100_test_400(two_seed_study, two_seed_markdown):
    results = pd.read_csv(two_seed_study / "results.csv", dtype={"train_domain": str, "test_domain": str})
    f1 = results[(results["model"] == "resnet18") & (results["metric"] == "macro_f1")]
    mean = f1.groupby(["train_domain", "test_domain"])["value"].mean()
    row = next(line for line in two_seed_markdown.splitlines()
               if line.startswith("| resnet18 | train 400 -> test 100 | train 100 -> test 400 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert float(cells[3]) == pytest.approx(mean[("400", "100")], abs=5e-4)
    assert float(cells[4]) == pytest.approx(mean[("100", "400")], abs=5e-4)
    difference, low, high = (float(x) for x in re.findall(r"[+-]\d\.\d+", cells[5]))
    assert difference == pytest.approx(mean[("400", "100")] - mean[("100", "400")], abs=1e-3)
    assert low <= difference <= high


def test_the_spec_s_reference_model_is_the_one_compared_against(two_seed_markdown):
    assert "### Paired differences against deit_small_patch16_224" in two_seed_markdown
    assert "*resnet18 minus deit_small_patch16_224: macro-F1 difference per train x test cell*" in two_seed_markdown


def test_several_seeds_show_mean_sd_and_a_pooled_interval_not_averaged_bounds(two_seed_study, two_seed_markdown):
    from histotoken.reporting import tables

    results = tables.read_results(two_seed_study / "results.csv")
    summary = tables.mean_over_seeds(results)
    assert summary["ci_low"].isna().all() and (summary["n_seeds"] == 2).all()
    in_domain = summary[(summary["model"] == "resnet18") & (summary["train_domain"] == "100")
                        & (summary["test_domain"] == "100") & (summary["metric"] == "macro_f1")].iloc[0]
    values = results[(results["model"] == "resnet18") & (results["train_domain"] == "100")
                     & (results["test_domain"] == "100") & (results["metric"] == "macro_f1")]["value"]
    assert in_domain["sd"] == pytest.approx(np.std(values, ddof=1))
    row = next(line for line in two_seed_markdown.splitlines() if line.startswith("| resnet18 | 100 | 100 | 2 |"))
    assert f"| {np.mean(values):.3f} | {np.std(values, ddof=1):.3f} |" in row


def test_a_study_without_predictions_files_gets_a_note(tmp_path):
    from tests.study_fixture import write_study

    study = write_study(tmp_path, with_predictions=False, with_images=False)
    assert "No run folder holds per-image predictions" in statistics_markdown(study)


def test_evaluation_notes_appear_next_to_the_numbers_in_the_report(tmp_path):
    import json

    from histotoken.formats import RunPaths
    from histotoken.reporting.blocks import Section
    from histotoken.reporting.render import render_markdown
    from histotoken.reporting.sections import SectionContext, in_domain
    from histotoken.reporting.study import load_study
    from tests.study_fixture import write_study

    study = write_study(tmp_path, train_domains=("100",), test_domains=("100", "400"), failed_run=None,
                        with_images=False)
    files = load_study(study)
    run_id, folder = files.run_folders()[0]
    note = "fewer than 5 test patients per class (adenosis 1): the metrics rest on very few patients"
    for domain in ("100", "400"):
        path = RunPaths(folder).eval_file(domain)
        evaluation = json.loads(path.read_text())
        path.write_text(json.dumps({**evaluation, "notes": [f"{note} at {domain}"]}))
    context = SectionContext(load_study(study))
    shown = render_markdown("t", [Section("in_domain", "In-domain", in_domain.build(context))], None)
    assert f"{run_id} on 100: {note} at 100" in shown and "at 400" not in shown  # in-domain only
    assert f"{run_id} on 400: {note} at 400" in statistics_markdown(study)
