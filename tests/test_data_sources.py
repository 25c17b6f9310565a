"""Data sources: ImageFolder trees (with and without groups), CIFAR-10 binary batches, detection, classes."""

from __future__ import annotations

import logging
import re
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


# --------------------------------------------------------------------------- the source package


def test_benign_malignant_tile_folders_are_an_imagefolder_not_breakhis(tmp_path):
    root, _ = write_imagefolder(tmp_path / "tiles", classes=("benign", "malignant"))
    assert detect_format(root) == "imagefolder"
    index = load_index(root)
    assert index.data_format == "imagefolder" and index.class_names == ("benign", "malignant")
    assert len(index.frame) == 24 and not index.skipped


def test_breakhis_is_recognised_by_its_file_names_even_without_its_folders(tmp_path):
    from histotoken.data.breakhis import breakhis_file_name
    from tests.conftest import write_png

    flat = tmp_path / "flat"
    for seq in (1, 2):
        write_png(flat / breakhis_file_name("adenosis", "14-1000", 100, seq))
    write_png(flat / breakhis_file_name("ductal_carcinoma", "14-2000", 100, 1))
    assert detect_format(flat) == "breakhis"
    frame = load_index(flat).frame
    assert sorted(frame["patient_id"].unique()) == ["14-1000", "14-2000"] and set(frame["label"]) == {"benign", "malignant"}


def test_folder_matching_two_sources_names_the_data_format_to_use(tmp_path):
    root = write_cifar(tmp_path / "both", per_file=2, train_files=1)
    (root / "tiles").mkdir()
    (root / "summary.csv").write_text("slide\n")
    with pytest.raises(ValueError, match="--data-format cifar10 or --data-format tiles"):
        detect_format(root)
    assert detect_format(root, "tiles") == "tiles"


def test_one_class_imagefolder_is_refused_before_anything_is_decoded(tmp_path, monkeypatch):
    import histotoken.data.decode as decode
    from histotoken.engine.fit import train

    root, _ = write_imagefolder(tmp_path / "one", classes=("tumour",))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image before checking the classes")

    monkeypatch.setattr(decode, "decode_array", no_decoding)
    message = f"{root.resolve()} has only one class folder (tumour); a classifier needs at least two"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_index(root)
    with pytest.raises(ValueError, match="only one class folder"):
        train(RunConfig(data=str(root), model="resnet18", img_size=32, epochs=1), tmp_path / "run")


def test_every_builtin_source_implements_the_protocol_and_the_registry_feeds_the_choices():
    from histotoken.cli.common import DATA_FORMAT_CHOICES
    from histotoken.config import DATA_FORMATS
    from histotoken.data.sources import DataSource, get_source, source_names

    assert source_names()[:4] == ("breakhis", "imagefolder", "cifar10", "tiles")
    assert DATA_FORMATS == DATA_FORMAT_CHOICES == ("auto", *source_names())
    for name in source_names():
        assert isinstance(get_source(name), DataSource) and get_source(name).name == name
    with pytest.raises(ValueError, match="unknown data format 'hdf5'.*breakhis, imagefolder, cifar10, tiles"):
        get_source("hdf5")


def test_a_registered_source_is_detected_read_and_accepted_by_the_config(tmp_path):
    import torch

    from histotoken.data import sources
    from histotoken.data.sources import IndexResult, SourceWords, register_source

    class Marker:
        name = "marker"
        words = SourceWords(group="case", groups="cases", class_word="class", classes_word="classes",
                            has_magnification=False, description="a marker folder")
        decodes_images = False
        key_suffix = ".mark"

        def detect(self, root):
            return (root / "MARKER").is_file()

        def scan(self, root, groups=None):
            frame = pd.DataFrame({"path": [f"{root / 'a.mark'}#0", f"{root / 'a.mark'}#1"], "patient_id": ["p", "q"],
                                  "tumor_class": ["x", "y"], "label": ["x", "y"], "magnification": 0,
                                  "width": 4, "height": 4})
            return IndexResult(frame, [], self.name, ("x", "y"), True)

        def read(self, key):
            return torch.full((3, 4, 4), int(key.rsplit("#", 1)[1]), dtype=torch.uint8)

        def classes(self, task, root=None, frame=None):
            return ("x", "y"), "label"

        def rebase(self, frame, new_root):
            return frame

    root = tmp_path / "m"
    root.mkdir()
    (root / "MARKER").touch()
    register_source(Marker())
    try:
        assert detect_format(root) == "marker" and RunConfig(data_format="marker").data_format == "marker"
        index = load_index(root)
        assert index.data_format == "marker" and len(index.frame) == 2
        assert int(read_image(index.frame["path"].iloc[1])[0, 0, 0]) == 1
        assert sources.words("marker").groups == "cases"
    finally:
        sources._REGISTERED.pop("marker")


def test_report_words_per_source():
    from histotoken.data.sources import SourceWords, words

    assert words("breakhis") == SourceWords()
    assert words("breakhis").class_word == "tumour class" and words("breakhis").has_magnification
    assert words("cifar10").groups == "images" and words("cifar10").description == "CIFAR-10 (binary batches)"
    assert words("tiles").group == "patient" and not words("tiles").has_magnification
    assert words("imagefolder") == words("auto") == words("something else")
    assert words("imagefolder").description == "an ImageFolder tree (one folder per class)"


@pytest.mark.parametrize("kind", ["breakhis", "imagefolder", "cifar10", "tiles"])
def test_rebase_moves_keys_to_a_copy_of_the_data(tmp_path, kind, synthetic_root):
    import shutil

    from histotoken.data.sources import rebase_frame

    if kind == "breakhis":
        root = tmp_path / "orig"
        shutil.copytree(synthetic_root, root)
    elif kind == "imagefolder":
        root, _ = write_imagefolder(tmp_path / "orig")
    elif kind == "cifar10":
        root = write_cifar(tmp_path / "orig" / "cifar-10-batches-bin", per_file=3, train_files=1).parent
    else:
        root = tmp_path / "orig"
        (root / "tiles").mkdir(parents=True)
        (root / "summary.csv").write_text("slide\n")
        pd.DataFrame({"slide": "s", "slide_path": "/slides/s.tif", "x": [0, 32], "y": 0, "level": 0, "read_size": 32,
                      "tile_size": 32, "label": ["a", "b"], "patient_id": "p"}).to_parquet(root / "tiles" / "s.parquet")
    frame = load_index(root).frame
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(root, copy)
    shutil.rmtree(root)
    moved = rebase_frame(frame, copy)
    assert detect_format(copy) == kind
    assert list(moved["label"]) == list(frame["label"])
    for key in moved["path"]:
        assert str(copy) in key and Path(key.split("#")[0]).is_file()
    if kind != "tiles":
        assert read_image(moved["path"].iloc[0]).shape[0] == 3


def test_data_modules_import_without_cycles():
    """index -> sources -> decode, dataset -> store: no module of data/ imports back up the chain."""
    import ast

    import histotoken.data as data

    base = Path(data.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in [*base.glob("*.py"), *(base / "sources").glob("*.py")]:
        module = "histotoken.data." + ".".join(path.relative_to(base).with_suffix("").parts).replace(".__init__", "")
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):  # function-level imports count too
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("histotoken.data"):
                imported.add(node.module)
        graph[module] = {m for m in imported if m != module and not m.startswith("histotoken.data.wsi")}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))

    cycles = sorted(m for m in graph if reaches(m, m, {m}))
    assert cycles == [], f"import cycles through {cycles}"
    assert not any(m.startswith("histotoken.data") for m in graph["histotoken.data.decode"])


def test_slide_library_errors_become_one_bad_tile_each_naming_the_slide(tmp_path, monkeypatch):
    import torch

    import histotoken.data.wsi.dataset as wsi_dataset
    from histotoken.data.dataset import ImageStore

    class OpenSlideError(Exception):  # openslide's own is a plain Exception subclass, as this one
        pass

    root = tmp_path / "tiles_out"
    (root / "tiles").mkdir(parents=True)
    (root / "summary.csv").write_text("slide,n_tiles\n")
    for slide in ("good", "garbage"):
        pd.DataFrame({
            "slide": slide, "slide_path": f"/slides/{slide}.svs", "x": [0, 32], "y": 0, "level": 0, "read_size": 32,
            "tile_size": 16, "label": ["normal", "tumor"], "patient_id": slide,
        }).to_parquet(root / "tiles" / f"{slide}.parquet")

    def read_tile(row):
        if "garbage" in row["slide_path"]:
            raise OpenSlideError("TIFFRGBAImageGet failed")
        return torch.full((3, 16, 16), 7, dtype=torch.uint8)

    monkeypatch.setattr(wsi_dataset, "read_tile", read_tile)
    frame = load_index(root).frame
    bad_key = frame.loc[frame["patient_id"] == "garbage", "path"].iloc[0]
    with pytest.raises(ValueError, match=r"/slides/garbage\.svs: TIFFRGBAImageGet failed"):
        read_image(bad_key)
    store = ImageStore.build(frame, 16, cache_dir=tmp_path / "cache")
    assert sorted(store.frame["patient_id"]) == ["good", "good"] and len(store.skipped) == 2
    assert all("garbage.svs" in reason for _, reason in store.skipped)


def test_images_in_hidden_folders_are_not_indexed(tmp_path):
    root, _ = write_imagefolder(tmp_path / "h", classes=("cats", "dogs"), groups=1, per_group=2)
    checkpoint = root / "cats" / ".ipynb_checkpoints" / "cats_g0_0-checkpoint.png"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes((root / "cats" / "cats_g0_0.png").read_bytes())
    (root / ".trash").mkdir()
    (root / ".trash" / "x.png").write_bytes(checkpoint.read_bytes())
    index = load_index(root)
    assert len(index.frame) == 4 and index.class_names == ("cats", "dogs")
