"""Data sources: ImageFolder trees (with and without groups), CIFAR-10 binary batches, detection, classes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histotoken.config import RunConfig
from histotoken.data.dataset import load_image
from histotoken.data.domains import select_domain
from histotoken.data.index import load_index
from histotoken.data.sources import detect_format, read_image, task_classes
from histotoken.data.splits import check_patient_disjoint, make_split

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar(folder: Path, per_file: int = 12, train_files: int = 2, seed: int = 0) -> Path:
    """A CIFAR-10 folder in the official binary format: records of 1 label byte + R, G, B planes (32x32)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR_NAMES) + "\n\n")
    names = [f"data_batch_{i}.bin" for i in range(1, train_files + 1)] + ["test_batch.bin"]
    for name in names:
        labels = np.arange(per_file, dtype=np.uint8) % 10
        pixels = rng.integers(0, 256, size=(per_file, 3 * 32 * 32), dtype=np.uint8)
        records = np.concatenate([labels[:, None], pixels], axis=1)
        (folder / name).write_bytes(records.tobytes())
    return folder


def write_imagefolder(root: Path, classes=("cats", "dogs"), groups: int = 4, per_group: int = 3) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for c, name in enumerate(classes):
        for g in range(groups):
            for i in range(per_group):
                path = root / name / f"{name}_g{g}_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                array = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                array[..., c] = 255  # class colour, so a model can learn it
                Image.fromarray(array).save(path)
                rows.append({"image": f"{name}/{name}_g{g}_{i}.png", "group": f"{name}-patient{g}"})
    return root, pd.DataFrame(rows)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar(tmp_path_factory.mktemp("cifar") / "cifar-10-batches-bin").parent


def test_detection_names_each_kind_and_the_flag_overrides_it(tmp_path, synthetic_root, cifar_root):
    folder_root, _ = write_imagefolder(tmp_path / "folders")
    tiles = tmp_path / "tiles"
    (tiles / "tiles").mkdir(parents=True)
    (tiles / "summary.csv").write_text("slide\n")
    assert detect_format(synthetic_root) == "breakhis"
    assert detect_format(folder_root) == "imagefolder"
    assert detect_format(cifar_root) == "cifar10"
    assert detect_format(cifar_root / "cifar-10-batches-bin") == "cifar10"
    assert detect_format(tiles) == "tiles"
    assert detect_format(folder_root, "cifar10") == "cifar10"
    with pytest.raises(FileNotFoundError, match="does not look like BreakHis"):
        detect_format(tmp_path / "tiles" / "tiles")
    with pytest.raises(ValueError, match="data_format"):
        RunConfig(data_format="hdf5")


def test_cifar_label_byte_names_the_class_from_batches_meta(cifar_root):
    index = load_index(cifar_root)
    frame = index.frame
    assert index.data_format == "cifar10" and index.class_names == tuple(CIFAR_NAMES)
    assert len(frame) == 36 and (frame["subset"] == "test").sum() == 12
    # record 7 of data_batch_2 has label byte 7 (written as i % 10) -> "horse"
    row = frame[frame["path"].str.endswith("data_batch_2.bin#7")].iloc[0]
    assert row["label"] == "horse" and row["tumor_class"] == "horse"
    names, column = task_classes("classes", str(cifar_root))
    assert names == tuple(CIFAR_NAMES) and column == "label"


def test_cifar_pixel_lands_in_its_channel_and_position(tmp_path):
    folder = write_cifar(tmp_path / "c", per_file=3, train_files=1)
    raw = bytearray((folder / "data_batch_1.bin").read_bytes())
    record, channel, y, x = 2, 1, 5, 9  # green plane, row 5, column 9 of the third record
    raw[record * 3073 + 1 + channel * 1024 + y * 32 + x] = 201
    raw[record * 3073 + 1 + 0 * 1024 + y * 32 + x] = 3
    (folder / "data_batch_1.bin").write_bytes(bytes(raw))
    image = read_image(f"{folder / 'data_batch_1.bin'}#{record}")
    assert image.shape == (3, 32, 32) and image.dtype.is_floating_point is False
    assert int(image[1, y, x]) == 201 and int(image[0, y, x]) == 3
    assert load_image(f"{folder / 'data_batch_1.bin'}#{record}", 32)[1, y, x] == 201


def test_cifar_split_keeps_the_official_test_batch(cifar_root):
    frame = load_index(cifar_root).frame
    split = make_split(frame, val=0.25, seed=0)
    test = split[split["split"] == "test"]
    assert sorted(test["path"]) == sorted(frame.loc[frame["subset"] == "test", "path"])
    train_part = split[split["split"] != "test"]
    val_per_class = train_part.groupby("label")["split"].agg(lambda s: (s == "val").sum())
    images_per_class = train_part.groupby("label").size()
    assert ((val_per_class - 0.25 * images_per_class).abs() <= 1).all()  # a quarter of each class, rounded
    assert not split.loc[split["split"] != "test", "path"].str.contains("test_batch").any()


def test_imagefolder_classes_are_sorted_folder_names(tmp_path):
    root, _ = write_imagefolder(tmp_path / "f", classes=("zebra", "apple"))
    index = load_index(root)
    assert index.data_format == "imagefolder" and index.class_names == ("apple", "zebra")
    assert set(index.frame["label"]) == {"apple", "zebra"} and (index.frame["magnification"] == 0).all()
    assert task_classes("binary", str(root)) == (("apple", "zebra"), "label")


def test_groups_csv_makes_group_disjoint_splits(tmp_path, caplog):
    root, groups = write_imagefolder(tmp_path / "g", groups=6)
    groups.assign(image=groups["image"].str.split("/").str[-1]).to_csv(root / "groups.csv", index=False)  # file names
    with caplog.at_level(logging.WARNING):
        index = load_index(root)
    assert index.grouped and "may land on both sides" not in caplog.text
    assert index.frame["patient_id"].nunique() == 12
    for seed in range(3):
        split = make_split(index.frame, val=0.2, test=0.2, seed=seed)
        check_patient_disjoint(split)  # raises if a group is on two sides
        assert set(split["split"]) == {"train", "val", "test"}


def test_groups_from_a_separate_csv_by_relative_path(tmp_path):
    root, groups = write_imagefolder(tmp_path / "h")
    groups.to_csv(tmp_path / "patients.csv", index=False)
    frame = load_index(root, groups=tmp_path / "patients.csv").frame
    row = frame[frame["path"].str.endswith("dogs/dogs_g2_1.png")].iloc[0]
    assert row["patient_id"] == "dogs-patient2"


def test_without_groups_split_warns_once_that_patients_may_leak(tmp_path, caplog):
    root, _ = write_imagefolder(tmp_path / "n")
    with caplog.at_level(logging.WARNING):
        first = load_index(root)
        load_index(root)
    assert not first.grouped
    assert caplog.text.count("may land on both sides") == 1


def test_split_cli_prints_the_ungrouped_warning(tmp_path, capsys):
    from histotoken.cli.main import main

    root, _ = write_imagefolder(tmp_path / "cli")
    assert main(["split", str(root), "--out", str(tmp_path / "s.csv")]) == 0
    assert "may land on both sides" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "s.csv")) == 24


def test_magnification_domain_on_data_without_magnifications_is_a_clear_error(tmp_path):
    root, _ = write_imagefolder(tmp_path / "m")
    frame = load_index(root).frame
    assert len(select_domain(frame, "all")) == len(frame)
    with pytest.raises(ValueError, match="has no magnifications"):
        select_domain(frame, "100")


def test_train_end_to_end_on_a_tiny_cifar_file(tmp_path):
    from histotoken.engine.fit import train

    root = write_cifar(tmp_path / "cifar-10-batches-bin", per_file=20, train_files=2).parent
    config = RunConfig(
        data=str(root), model="resnet18", task="classes", img_size=32, epochs=1, batch_size=16,
        bootstrap=0, precision="32-true",
    )
    result = train(config, tmp_path / "run", progress_bar=False)
    assert result.best["class_names"] == CIFAR_NAMES
    assert result.evaluation["n_images"] == 20  # the official test batch


def test_train_end_to_end_on_an_imagefolder_tree(tmp_path):
    from histotoken.engine.fit import train

    root, _ = write_imagefolder(tmp_path / "tree", groups=5)
    config = RunConfig(
        data=str(root), model="resnet18", img_size=32, epochs=1, batch_size=8, bootstrap=0,
        precision="32-true", val_fraction=0.2, test_fraction=0.2,
    )
    result = train(config, tmp_path / "run", progress_bar=False)
    assert result.best["class_names"] == ["cats", "dogs"]
    assert result.evaluation["class_names"] == ["cats", "dogs"]


def test_shipped_cifar_specs_expand_and_magnification_specs_fail_on_folders(tmp_path, cifar_root):
    from histotoken.cli.grid import resolve_spec_path
    from histotoken.experiments.grid import prepare_study
    from histotoken.experiments.spec import expand, load_spec, spec_from_dict

    tl = load_spec(resolve_spec_path("cifar10_tokenlearner.yaml"), str(cifar_root))
    pruning = load_spec(resolve_spec_path("cifar10_pruning.yaml"), str(cifar_root))
    assert {m.name for m in tl.models} == {"tokenlearner_vit_mini", "vit_mini_patch4_32"}
    assert sorted(dict(m.kwargs).get("keep_ratio") for m in pruning.models if m.name.startswith("cnnprune")) == [
        0.4, 0.6, 0.8,
    ]
    assert len(expand(tl)) == 6 and len(expand(pruning)) == 15
    assert expand(tl)[0].config(tl, tmp_path / "s.csv").data_format == "cifar10"
    root, _ = write_imagefolder(tmp_path / "folders")
    raw = {"models": ["resnet18"], "train_domains": ["100"], "tasks": ["classes"]}
    with pytest.raises(ValueError, match="has no magnifications"):
        prepare_study(spec_from_dict(raw, "spec.yaml", str(root)), tmp_path / "study")


def test_tile_folder_is_indexed_by_table_row_and_read_through_the_slide_reader(tmp_path, monkeypatch):
    import torch

    import histotoken.data.wsi.dataset as wsi_dataset

    root = tmp_path / "tiles_out"
    (root / "tiles").mkdir(parents=True)
    (root / "summary.csv").write_text("slide,n_tiles\nslide_a,3\n")
    table = pd.DataFrame({
        "slide": "slide_a", "slide_path": "/slides/a.tif", "x": [0, 256, 512], "y": 0, "level": 0,
        "read_size": 256, "tile_size": 32, "mpp": 0.5, "tissue_fraction": 0.9,
        "label": ["tumor", "normal", None], "patient_id": "patient_7",
    })
    table.to_parquet(root / "tiles" / "slide_a.parquet")
    seen = []

    def fake_read_tile(row):
        seen.append(int(row["x"]))
        return torch.full((3, 32, 32), int(row["x"]) // 256, dtype=torch.uint8)

    monkeypatch.setattr(wsi_dataset, "read_tile", fake_read_tile)
    index = load_index(root)
    assert index.data_format == "tiles" and index.class_names == ("normal", "tumor")
    assert len(index.frame) == 2 and [p for p, _ in index.skipped] == [f"{root / 'tiles' / 'slide_a.parquet'}#2"]
    assert set(index.frame["patient_id"]) == {"patient_7"}
    image = read_image(index.frame["path"].iloc[1])
    assert seen == [256] and int(image[0, 0, 0]) == 1


def test_index_cli_lists_classes_of_a_cifar_folder(cifar_root, capsys):
    from histotoken.cli.main import main

    assert main(["index", str(cifar_root), "--data-format", "cifar10"]) == 0
    out = capsys.readouterr().out
    assert "36 images" in out and "cifar10: images per class" in out and "horse" in out
