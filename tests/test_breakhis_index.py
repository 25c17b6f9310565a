from pathlib import Path

import pytest

from histotoken.data.breakhis import breakhis_image_path, counts_table, find_breast_root, parse_file_name
from histotoken.data.index import load_index
from histotoken.data.sources.breakhis import scan_breakhis
from tests.conftest import write_png


@pytest.mark.parametrize(
    "name, patient, tumor_class, label, magnification",
    [
        ("SOB_B_A-14-22549AB-40-001.png", "14-22549AB", "adenosis", "benign", 40),
        ("SOB_B_PT-14-21998AB-100-005.png", "14-21998AB", "phyllodes_tumor", "benign", 100),
        ("SOB_M_DC-14-2523-400-013.png", "14-2523", "ductal_carcinoma", "malignant", 400),
        ("SOB_M_LC-14-13412-200-030.png", "14-13412", "lobular_carcinoma", "malignant", 200),
        ("SOB_B_TA-14-13200-40-002.png", "14-13200", "tubular_adenoma", "benign", 40),
        ("SOB_M_PC-15-190EF-100-010.png", "15-190EF", "papillary_carcinoma", "malignant", 100),
    ],
)
def test_real_breakhis_names_parse_to_patient_class_and_magnification(name, patient, tumor_class, label, magnification):
    parsed = parse_file_name(name)
    assert (parsed.patient_id, parsed.tumor_class, parsed.label, parsed.magnification) == (
        patient, tumor_class, label, magnification,
    )


@pytest.mark.parametrize(
    "name, reason",
    [
        ("IMG_0001.png", "does not follow"),
        ("SOB_B_XX-14-22549AB-40-001.png", "unknown subtype"),
        ("SOB_M_A-14-22549AB-40-001.png", "contradicts"),
        ("SOB_B_A-14-22549AB-60-001.png", "magnification 60"),
    ],
)
def test_names_that_do_not_parse_say_why(name, reason):
    with pytest.raises(ValueError, match=reason):
        parse_file_name(name)


def test_patient_under_two_subtypes_keeps_one_patient_id(tmp_path):
    # BreakHis has patient 14-13412 under both ductal and lobular carcinoma.
    for tumor_class in ("ductal_carcinoma", "lobular_carcinoma"):
        write_png(breakhis_image_path(tmp_path, tumor_class, "14-13412", 100, 1))
    frame = scan_breakhis(tmp_path).frame
    assert set(frame["patient_id"]) == {"14-13412"}
    assert set(frame["tumor_class"]) == {"ductal_carcinoma", "lobular_carcinoma"}


def test_data_root_may_be_any_level_down_to_breast(synthetic_root):
    breast = synthetic_root / "BreaKHis_v1" / "histology_slides" / "breast"
    for level in (synthetic_root, synthetic_root / "BreaKHis_v1", breast.parent, breast):
        assert find_breast_root(level) == breast


def test_a_folder_that_is_not_breakhis_gets_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not look like BreakHis"):
        find_breast_root(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_breast_root(tmp_path / "missing")


def test_index_lists_bad_files_with_reasons_and_keeps_the_good_ones(tmp_path):
    good = write_png(breakhis_image_path(tmp_path, "adenosis", "14-1000", 40, 1))
    gray = write_png(breakhis_image_path(tmp_path, "adenosis", "14-1000", 40, 2), mode="L")
    rgba = write_png(breakhis_image_path(tmp_path, "fibroadenoma", "14-1001", 40, 1), mode="RGBA")
    empty = breakhis_image_path(tmp_path, "adenosis", "14-1000", 40, 3)
    empty.touch()
    truncated = breakhis_image_path(tmp_path, "adenosis", "14-1000", 40, 4)
    truncated.write_bytes(good.read_bytes()[:60])
    corrupt = breakhis_image_path(tmp_path, "adenosis", "14-1000", 40, 5)
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    misnamed = write_png(good.parent / "scan 1.png")
    (good.parent.parent / "400X").mkdir()  # an empty magnification folder

    result = scan_breakhis(tmp_path)
    reasons = dict(result.skipped)
    assert set(result.frame["path"]) == {str(p.resolve()) for p in (good, gray, rgba)}
    assert "empty file" in reasons[str(empty)]
    assert "not a readable image" in reasons[str(truncated)]
    assert "not a readable image" in reasons[str(corrupt)]
    assert "does not follow" in reasons[str(misnamed)]


def test_indexing_never_writes_into_the_data_folder(synthetic_root):
    before = sorted(p for p in synthetic_root.rglob("*"))
    load_index(synthetic_root, refresh=True)
    assert sorted(p for p in synthetic_root.rglob("*")) == before


def test_cached_index_is_reused_and_refreshed_when_files_change(tmp_path):
    write_png(breakhis_image_path(tmp_path, "adenosis", "14-1000", 40, 1))
    assert len(load_index(tmp_path).frame) == 1
    write_png(breakhis_image_path(tmp_path, "adenosis", "14-1000", 40, 2))
    assert len(load_index(tmp_path).frame) == 2


def test_counts_table_totals_images_and_patients(synthetic_root):
    frame = load_index(synthetic_root).frame
    table = counts_table(frame)
    assert table.loc["total", "images"] == len(frame)
    assert table.loc["total", "patients"] == frame["patient_id"].nunique()
    assert table.loc["adenosis", "40X"] == len(frame[(frame.tumor_class == "adenosis") & (frame.magnification == 40)])


def test_index_paths_are_absolute(synthetic_root):
    frame = load_index(synthetic_root).frame
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in frame["path"])
