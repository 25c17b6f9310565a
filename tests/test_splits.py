import logging

import pandas as pd
import pytest

from histotoken.data.breakhis import SUBTYPES, label_of_subtype
from histotoken.data.domains import domain_name, parse_domain, select_domain
from histotoken.data.splits import check_patient_disjoint, make_split, read_split, write_split


def fake_index(patients_per_class=6, images=4, shared="14-13412") -> pd.DataFrame:
    """Index rows for patients_per_class patients per subtype, 4 magnifications each."""
    rows = []
    for ci, tumor_class in enumerate(SUBTYPES):
        for p in range(patients_per_class):
            patient = f"14-{ci}{p:03d}"
            for mag in (40, 100, 200, 400):
                for seq in range(images):
                    rows.append((f"/x/{tumor_class}/{patient}/{mag}/{seq}.png", patient, tumor_class, mag))
    # the BreakHis patient filed under two subtypes
    for tumor_class in ("ductal_carcinoma", "lobular_carcinoma"):
        for mag in (40, 100, 200, 400):
            rows.append((f"/x/{tumor_class}/{shared}/{mag}/0.png", shared, tumor_class, mag))
    frame = pd.DataFrame(rows, columns=["path", "patient_id", "tumor_class", "magnification"])
    frame["label"] = frame["tumor_class"].map(label_of_subtype)
    return frame


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_patient_split_is_disjoint_and_covers_every_subtype(seed):
    split = make_split(fake_index(), seed=seed)
    check_patient_disjoint(split)  # raises on leakage
    for side in ("train", "val", "test"):
        assert set(split.loc[split.split == side, "tumor_class"]) == set(SUBTYPES), side
    sides = split.groupby("patient_id")["split"].nunique()
    assert (sides == 1).all()
    assert split.loc[split.patient_id == "14-13412", "split"].nunique() == 1


def test_test_patients_have_every_magnification_in_test():
    split = make_split(fake_index(), seed=5)
    test = split[split.split == "test"]
    assert (test.groupby("patient_id")["magnification"].nunique() == 4).all()


def test_fractions_are_roughly_respected():
    split = make_split(fake_index(patients_per_class=20), val=0.2, test=0.2, seed=0)
    patients = split.groupby("split")["patient_id"].nunique()
    total = patients.sum()
    assert abs(patients["test"] / total - 0.2) < 0.05
    assert abs(patients["val"] / total - 0.2) < 0.05


def test_different_seeds_give_different_patient_splits():
    a = make_split(fake_index(), seed=0)
    b = make_split(fake_index(), seed=1)
    assert set(a.loc[a.split == "test", "patient_id"]) != set(b.loc[b.split == "test", "patient_id"])


@pytest.mark.parametrize("folds", [3, 5])
def test_folds_put_every_patient_in_test_exactly_once(folds):
    index = fake_index()
    seen = []
    for fold in range(folds):
        split = make_split(index, folds=folds, fold=fold, seed=0)
        check_patient_disjoint(split)
        assert (split.split == "val").any()
        seen.extend(split.loc[split.split == "test", "patient_id"].unique())
    assert sorted(seen) == sorted(index["patient_id"].unique())


def test_image_scheme_warns_that_it_leaks_patients(caplog):
    with caplog.at_level(logging.WARNING):
        split = make_split(fake_index(), scheme="image", seed=0)
    assert "optimistic" in caplog.text
    assert (split.groupby("patient_id")["split"].nunique() > 1).any()


@pytest.mark.parametrize("kwargs", [{"val": 0.6, "test": 0.5}, {"scheme": "random"}, {"folds": 3, "fold": 3}])
def test_bad_split_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        make_split(fake_index(), **kwargs)


def test_split_csv_round_trips_and_bad_files_name_themselves(tmp_path):
    split = make_split(fake_index(), seed=0)
    path = write_split(split, tmp_path / "splits.csv")
    pd.testing.assert_frame_equal(read_split(path), split)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,split\na,train\n")
    with pytest.raises(ValueError, match="bad.csv"):
        read_split(bad)


@pytest.mark.parametrize(
    "text, mags, name",
    [("100", (100,), "100"), ("400+100", (100, 400), "100+400"), ("all", (40, 100, 200, 400), "all"), ("40X", (40,), "40")],
)
def test_domains_parse_and_have_one_canonical_name(text, mags, name):
    assert parse_domain(text) == mags
    assert domain_name(text) == name


@pytest.mark.parametrize("text", ["60", "hundred", "100+x"])
def test_bad_domains_are_refused(text):
    with pytest.raises(ValueError, match="domain|magnification"):
        parse_domain(text)


def test_domain_with_no_images_names_the_domain():
    frame = fake_index()
    frame = frame[frame.magnification != 400]
    with pytest.raises(ValueError, match="domain 400 has no images"):
        select_domain(frame, "400")
