"""The synthetic BreakHis: layout, naming, marker, determinism, folder safety, and that it carries signal.

Most tests read the session fixtures of conftest.py (``synthetic_root``: 8 subtypes x 3
patients x 2 images x 4 magnifications at 64x48; ``learnable_root``: 6 patients a class, 4 images each at
100x and 400x), so the data sets are drawn once per test session.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histotoken.data.breakhis import (
    MAGNIFICATIONS,
    SUBTYPES,
    SYNTHETIC_MARKER,
    is_synthetic,
    label_of_subtype,
    parse_file_name,
)
from histotoken.data.sources.breakhis import scan_breakhis
from histotoken.data.synthetic import (
    GENERATOR_VERSION,
    SHARED_PATIENT_SUBTYPES,
    generate_synthetic_breakhis,
    make_patient_ids,
)

SMALL = {"patients_per_class": 2, "images_per_patient": 1, "magnifications": (40, 400), "size": (48, 32)}


def _pngs(root: Path) -> list[Path]:
    return sorted(root.rglob("*.png"))


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()
    }


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _patient_index(root: Path) -> dict[tuple[str, str], int]:
    """(tumor_class, patient_id) -> the patient's position in its class, from the marker file."""
    patients = json.loads((root / SYNTHETIC_MARKER).read_text())["patients"]
    return {(tumor_class, pid): k for tumor_class, ids in patients.items() for k, pid in enumerate(ids)}


# ---------------------------------------------------------------------------------------- layout


def test_every_file_sits_in_the_breakhis_layout_and_its_name_parses_back(synthetic_root):
    breast = synthetic_root / "BreaKHis_v1" / "histology_slides" / "breast"
    for path in _pngs(synthetic_root):
        parsed = parse_file_name(path)
        label, sob, tumor_class, patient_folder, magnification_folder = path.relative_to(breast).parts[:5]
        assert (label, sob, tumor_class) == (parsed.label, "SOB", parsed.tumor_class)
        assert label == label_of_subtype(tumor_class)
        assert patient_folder.endswith("_" + parsed.patient_id)
        assert patient_folder.startswith(f"SOB_{'B' if label == 'benign' else 'M'}_")
        assert magnification_folder == f"{parsed.magnification}X"
        assert re.fullmatch(r"\d{2}-\d+[A-Z]*", parsed.patient_id), parsed.patient_id


def test_counts_match_the_parameters_and_the_index_reads_every_image(synthetic_root):
    files = _pngs(synthetic_root)
    assert len(files) == 8 * 3 * 2 * 4
    parsed = [parse_file_name(path) for path in files]
    assert Counter(p.tumor_class for p in parsed) == {name: 3 * 2 * 4 for name in SUBTYPES}
    assert Counter(p.magnification for p in parsed) == {m: 8 * 3 * 2 for m in MAGNIFICATIONS}
    per_folder = Counter(path.parent for path in files)
    assert set(per_folder.values()) == {2}  # images_per_patient in every patient x magnification folder
    result = scan_breakhis(synthetic_root)
    assert len(result.frame) == len(files) and not result.skipped
    assert set(zip(result.frame["width"], result.frame["height"], strict=True)) == {(64, 48)}


def test_images_are_rgb_pngs_of_the_requested_size(tmp_path):
    out = tmp_path / "data"
    generate_synthetic_breakhis(out, **{**SMALL, "size": (50, 37)})
    for path in _pngs(out):
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (50, 37))


def test_the_marker_says_synthetic_and_records_the_parameters(synthetic_root):
    marker = json.loads((synthetic_root / SYNTHETIC_MARKER).read_text())
    assert marker["synthetic"] is True and marker["complete"] is True
    assert "synthetic" in marker["note"] and "not pathology" in marker["note"]
    assert marker["generator_version"] == GENERATOR_VERSION
    assert marker["parameters"] == {
        "patients_per_class": 3,
        "images_per_patient": 2,
        "magnifications": [40, 100, 200, 400],
        "size": [64, 48],
        "seed": 0,
    }
    assert marker["n_images"] == len(_pngs(synthetic_root))
    assert marker["patients"] == make_patient_ids(0, 3)
    # the field of view shrinks 10x from 40x to 400x
    assert marker["field_of_view_um"]["40"][0] == pytest.approx(10 * marker["field_of_view_um"]["400"][0])
    assert is_synthetic(synthetic_root)


def test_one_patient_id_appears_under_two_subtypes_and_all_others_are_unique(synthetic_root):
    frame = scan_breakhis(synthetic_root, check_images=False).frame
    classes_per_patient = frame.groupby("patient_id")["tumor_class"].unique()
    shared = {pid: sorted(classes) for pid, classes in classes_per_patient.items() if len(classes) > 1}
    assert len(shared) == 1
    assert list(shared.values())[0] == sorted(SHARED_PATIENT_SUBTYPES)
    assert frame["patient_id"].nunique() == 8 * 3 - 1
    named = json.loads((synthetic_root / SYNTHETIC_MARKER).read_text())["shared_patient"]
    assert named["patient_id"] in shared


def test_with_one_patient_per_class_no_id_is_shared():
    ids = make_patient_ids(0, 1)
    assert len({pid for values in ids.values() for pid in values}) == 8


# ---------------------------------------------------------------------------------------- determinism


def test_same_parameters_give_byte_identical_files_in_any_number_of_processes(tmp_path):
    first = generate_synthetic_breakhis(tmp_path / "a", seed=5, **SMALL)
    generate_synthetic_breakhis(tmp_path / "b", seed=5, **SMALL, workers=2)
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert len(a) == first.n_images + 1  # images + marker
    assert a == b


def test_a_different_seed_gives_different_patients_and_pixels(tmp_path):
    generate_synthetic_breakhis(tmp_path / "a", seed=0, **SMALL)
    generate_synthetic_breakhis(tmp_path / "b", seed=1, **SMALL)
    ids_a, ids_b = make_patient_ids(0, 2), make_patient_ids(1, 2)
    assert ids_a != ids_b
    # images paired within each subtype (sorted paths): the pixels differ clearly
    pairs = zip(_pngs(tmp_path / "a"), _pngs(tmp_path / "b"), strict=True)
    differences = [np.abs(_rgb(x).astype(int) - _rgb(y).astype(int)).mean() for x, y in pairs]
    assert min(differences) > 5


# ---------------------------------------------------------------------------------------- folder safety


def test_refuses_a_non_empty_folder_that_is_not_a_synthetic_set(tmp_path):
    (tmp_path / "thesis.txt").write_text("precious")
    with pytest.raises(ValueError, match="not empty and is not a synthetic set"):
        generate_synthetic_breakhis(tmp_path, **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.txt"]


def test_refuses_a_file_in_place_of_the_folder(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        generate_synthetic_breakhis(target, **SMALL)


def test_writes_nothing_outside_the_output_folder_and_leaves_no_temporary_files(tmp_path):
    generate_synthetic_breakhis(tmp_path / "nested" / "data", **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["nested"]
    assert [p.name for p in (tmp_path / "nested").iterdir()] == ["data"]
    assert not [
        p for p in (tmp_path / "nested").rglob("*") if p.is_file() and p.suffix not in (".png", ".json")
    ]


def test_rerun_with_the_same_parameters_writes_nothing(tmp_path, caplog):
    out = tmp_path / "data"
    generate_synthetic_breakhis(out, **SMALL)
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()}
    with caplog.at_level("INFO", logger="histotoken.data.synthetic"):
        again = generate_synthetic_breakhis(out, **SMALL)
    assert again.created == 0 and again.n_images == len(before) - 1
    assert "already holds this synthetic set" in caplog.text
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()} == before


def test_rerun_completes_an_interrupted_set_with_identical_files(tmp_path):
    out = tmp_path / "data"
    generate_synthetic_breakhis(out, **SMALL)
    complete = _tree_bytes(out)
    victims = _pngs(out)[:3]
    for path in victims:
        path.unlink()
    summary = generate_synthetic_breakhis(out, **SMALL)
    assert summary.created == 3
    assert _tree_bytes(out) == complete


def test_rerun_with_other_parameters_is_refused_and_names_the_difference(tmp_path):
    out = tmp_path / "data"
    generate_synthetic_breakhis(out, **SMALL)
    before = _tree_bytes(out)
    with pytest.raises(ValueError, match=r"seed 0 there, 3 asked.*[Pp]ick another folder"):
        generate_synthetic_breakhis(out, **SMALL, seed=3)
    assert _tree_bytes(out) == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"magnifications": (40, 50)}, "magnifications must be"),
        ({"magnifications": ()}, "magnifications must be"),
        ({"size": (8, 32)}, "size must be"),
        ({"patients_per_class": 0}, "patients_per_class"),
        ({"images_per_patient": 1000}, "images_per_patient"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_parameters_are_refused_before_anything_is_written(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        generate_synthetic_breakhis(tmp_path / "data", **{**SMALL, **change})
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------------------------------- signal


def _hematoxylin_blob_size(rgb: np.ndarray) -> float:
    """Mean area (pixels) of the connected dark regions of the red-channel optical density.

    Hematoxylin absorbs red far more than eosin does, so red optical density is mostly
    nuclei; the darkest 15% of pixels form blobs whose size follows the nuclei's and
    glands' size in pixels.
    """
    from scipy import ndimage

    density = -np.log(np.clip(rgb[..., 0].astype(np.float32) / 255, 1 / 255, 1))
    dark = density > np.percentile(density, 85)
    _, n_blobs = ndimage.label(dark)
    return dark.sum() / max(n_blobs, 1)


def test_structures_are_larger_in_pixels_at_400x_than_at_40x(synthetic_root):
    sizes: dict[tuple[str, int], list[float]] = {}
    for path in _pngs(synthetic_root):
        parsed = parse_file_name(path)
        if parsed.magnification in (40, 400):
            key = (parsed.tumor_class, parsed.magnification)
            sizes.setdefault(key, []).append(_hematoxylin_blob_size(_rgb(path)))
    mean_40 = np.mean([v for (_, m), values in sizes.items() if m == 40 for v in values])
    mean_400 = np.mean([v for (_, m), values in sizes.items() if m == 400 for v in values])
    assert mean_400 > 2.0 * mean_40, (mean_40, mean_400)
    # not the effect of one or two subtypes: most show it on their own
    growing = [name for name in SUBTYPES if np.mean(sizes[(name, 400)]) > 1.3 * np.mean(sizes[(name, 40)])]
    assert len(growing) >= 6, growing


def _features(rgb: np.ndarray) -> np.ndarray:
    """Cheap image features: optical-density histograms and moments plus a few texture statistics."""
    rgb = rgb.astype(np.float32) / 255
    density = -np.log(np.clip(rgb, 1 / 255, 1))
    features = []
    for c in range(3):
        features += list(np.histogram(density[..., c], bins=8, range=(0, 2.5))[0] / density[..., c].size)
    features += list(density.reshape(-1, 3).mean(0)) + list(density.reshape(-1, 3).std(0))
    grey = density.sum(-1)
    for lag in (1, 2, 4, 8):
        features += [np.abs(grey[:, lag:] - grey[:, :-lag]).mean(), np.abs(grey[lag:] - grey[:-lag]).mean()]
    features.append((rgb.mean(-1) > 0.85).mean())  # lumens, clefts, spaces
    return np.array(features)


def _learnable_split(root: Path):
    """Features, subtype, magnification and a held-out mask (the last patient of each class)."""
    slot = _patient_index(root)
    rows = [(path, parse_file_name(path)) for path in _pngs(root)]
    features = np.stack([_features(_rgb(path)) for path, _ in rows])
    subtype = np.array([SUBTYPES.index(p.tumor_class) for _, p in rows])
    magnification = np.array([p.magnification for _, p in rows])
    held_out = np.array([slot[(p.tumor_class, p.patient_id)] == 2 for _, p in rows])
    train_ids = {p.patient_id for (_, p), test in zip(rows, held_out, strict=True) if not test}
    test_ids = {p.patient_id for (_, p), test in zip(rows, held_out, strict=True) if test}
    assert not train_ids & test_ids  # patient-disjoint, the shared id included
    return features, subtype, magnification, held_out


def _fit(features: np.ndarray, labels: np.ndarray):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.3)).fit(features, labels)


def test_subtype_is_learnable_from_64px_images_on_held_out_patients(learnable_root):
    features, subtype, _, held_out = _learnable_split(learnable_root)
    predicted = _fit(features[~held_out], subtype[~held_out]).predict(features[held_out])
    accuracy = (predicted == subtype[held_out]).mean()
    assert accuracy > 0.35, accuracy  # chance is 1/8
    binary_accuracy = (
        (predicted >= 4) == (subtype[held_out] >= 4)
    ).mean()  # the last 4 subtypes are malignant
    assert binary_accuracy > 0.65, binary_accuracy  # chance is about 1/2


def test_a_model_trained_at_100x_loses_accuracy_at_400x(learnable_root):
    features, subtype, magnification, held_out = _learnable_split(learnable_root)
    train = ~held_out & (magnification == 100)
    model = _fit(features[train], subtype[train])
    at_100, at_400 = (
        (
            model.predict(features[held_out & (magnification == m)])
            == subtype[held_out & (magnification == m)]
        ).mean()
        for m in (100, 400)
    )
    assert at_100 > 0.35, at_100
    assert at_400 < at_100 - 0.15, (at_100, at_400)


# ---------------------------------------------------------------------------------------- command line


def test_command_writes_the_set_and_prints_where_it_is(tmp_path, capsys):
    from histotoken.cli.main import main

    out = tmp_path / "data"
    argv = [
        "synth",
        str(out),
        "--patients-per-class",
        "2",
        "--images-per-patient",
        "1",
        "--magnifications",
        "100,400",
        "--size",
        "40x30",
        "--seed",
        "2",
        "--workers",
        "1",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed and "32 images" in printed and "synthetic" in printed
    assert len(_pngs(out)) == 8 * 2 * 2
    assert main(argv) == 0
    assert "nothing written" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--size", "700", "WIDTHxHEIGHT"),
        ("--size", "10x10", "from 16 to 4096"),
        ("--magnifications", "40,300", "subset of 40,100,200,400"),
        ("--patients-per-class", "0", ">= 1"),
    ],
)
def test_command_rejects_malformed_options_with_a_clear_message(tmp_path, capsys, option, value, message):
    from histotoken.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["synth", str(tmp_path / "data"), option, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_command_refuses_a_foreign_folder_with_a_one_line_error(tmp_path, capsys):
    from histotoken.cli.main import main

    (tmp_path / "notes.txt").write_text("x")
    assert main(["synth", str(tmp_path), "--size", "32x24", "--workers", "1"]) == 2
    error = capsys.readouterr().err
    assert "not a synthetic set" in error and error.count("\n") == 1


def test_size_and_magnification_parsers_accept_the_documented_forms():
    from histotoken.cli.synth import parse_magnifications, parse_size

    assert parse_size("700x460") == (700, 460)
    assert parse_size("128X96") == (128, 96)
    assert parse_magnifications("400,40X, 100") == [40, 100, 400]
