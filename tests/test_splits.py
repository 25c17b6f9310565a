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


def leaking_csv(tmp_path, scheme_column: str | None = None):
    """A hand-made split file: patient 14-777 has one image in train and one in test."""
    lines = ["path,patient_id,tumor_class,label,magnification,split" + (",scheme" if scheme_column else "")]
    rows = [("/x/a.png", "14-777", "adenosis", "benign", 40, "train"),
            ("/x/b.png", "14-777", "adenosis", "benign", 100, "test"),
            ("/x/c.png", "14-888", "fibroadenoma", "benign", 40, "val")]
    for row in rows:
        lines.append(",".join(map(str, row)) + (f",{scheme_column}" if scheme_column else ""))
    path = tmp_path / "user_split.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_user_split_with_a_patient_on_two_sides_is_refused_naming_patient_and_file(tmp_path):
    path = leaking_csv(tmp_path)
    with pytest.raises(ValueError, match=r"user_split\.csv puts patient\(s\) '14-777' on more than one side") as error:
        read_split(path)
    assert "histotoken split" in str(error.value) and "scheme=image" in str(error.value)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="14-777"):
        check_patient_disjoint(pd.read_csv(path, dtype=str), path)


def test_a_split_file_that_records_the_image_scheme_may_leak(tmp_path):
    assert read_split(leaking_csv(tmp_path, "image"))["patient_id"].eq("14-777").sum() == 2
    with pytest.raises(ValueError, match="14-777"):  # a file that says "patient" is checked
        read_split(leaking_csv(tmp_path, "patient"))


def test_an_image_split_records_its_scheme_and_reads_back(tmp_path):
    split = make_split(fake_index(), scheme="image", seed=0)
    again = read_split(write_split(split, tmp_path / "image.csv"))
    assert set(again["scheme"]) == {"image"}
    assert (again.groupby("patient_id")["split"].nunique() > 1).any()


def test_training_refuses_a_leaking_splits_file(tmp_path):
    from histotoken.config import RunConfig
    from histotoken.engine.fit import train

    config = RunConfig(splits=str(leaking_csv(tmp_path)), model="resnet18", epochs=1, img_size=32)
    with pytest.raises(ValueError, match="14-777"):
        train(config, tmp_path / "run")


def test_a_class_without_validation_or_test_patients_is_warned_about(caplog):
    index = fake_index(patients_per_class=6)
    index = index[~((index["tumor_class"] == "adenosis") & ~index["patient_id"].isin(["14-0000", "14-0001"]))]
    with caplog.at_level(logging.WARNING):
        split = make_split(index, seed=0)
    from histotoken.data.splits import empty_side_warnings

    warnings = empty_side_warnings(split)
    assert any("adenosis got no validation patients" in w for w in warnings)
    assert any("adenosis got no test patients" in w for w in warnings)
    assert "adenosis got no test patients" in caplog.text
    assert empty_side_warnings(make_split(fake_index(), seed=0)) == []


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


def test_the_split_command_prints_a_warning_for_a_class_without_test_patients(tmp_path, capsys):
    from histotoken.cli.main import main
    from tests.conftest import write_png

    root = tmp_path / "folder"
    groups = ["image,group"]
    for name, n_groups in (("rare", 2), ("common", 8)):
        for group in range(n_groups):
            image = f"{name}/{name}_{group}.png"
            write_png(root / image)
            groups.append(f"{image},{name}{group}")
    (root / "groups.csv").write_text("\n".join(groups) + "\n")
    out = tmp_path / "split.csv"
    assert main(["split", str(root), "--out", str(out), "--data-format", "imagefolder"]) == 0
    printed = capsys.readouterr().out
    assert "WARNING: class(es) rare got no test patients" in printed
    assert read_split(out).groupby("patient_id")["split"].nunique().max() == 1


def test_a_caller_that_knows_the_split_is_image_level_may_read_an_old_file_without_the_record(tmp_path):
    path = leaking_csv(tmp_path)
    assert len(read_split(path, image_scheme=True)) == 3
