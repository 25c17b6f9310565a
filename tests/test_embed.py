"""``histotoken embed``: CLAM-layout HDF5 per slide, image-set files keyed like the index, features equal to
the backbone's own output, reuse and per-slide resume, token-merging comparison, offline --pretrained."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image

import histotoken.models  # noqa: F401  (registers vit_mini_patch4_32)
from histotoken import formats
from histotoken.cli.main import main
from histotoken.data.index import load_index
from histotoken.data.wsi.reader import Resolution
from histotoken.data.wsi.tiling import TilingSettings, slide_jobs, tile_slides
from histotoken.features.embed import EmbedSettings, compare_merging, embed
from tests.slide_fixture import NORMAL_SLIDE, TILE_SIZE, TILE_SPAN, TUMOR_SLIDE, shared_slide_set

MODEL = "vit_mini_patch4_32"  # 32 px input, 64 patch tokens
DIM = 128  # its embedding width
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # timm's ImageNet defaults


@pytest.fixture(scope="module")
def tiles_dir(tmp_path_factory):
    slide_set = shared_slide_set(tmp_path_factory)
    out = tmp_path_factory.mktemp("tiles")
    jobs = slide_jobs([slide_set["tumour"], slide_set["normal"]], slide_set["annotations"], slide_set["labels"])
    tile_slides(jobs, out, TilingSettings(tile_size=TILE_SIZE, resolution=Resolution(0.5, "mpp")))
    return out


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A backbone's weights written by safetensors; the test builds its own model from them."""
    from safetensors.torch import save_file

    torch.manual_seed(123)
    model = timm.create_model(MODEL, num_classes=0)
    path = tmp_path_factory.mktemp("weights") / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def slide_features(tiles_dir, weights_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("features") / "vit_mini"
    result = embed(tiles_dir, out, EmbedSettings(MODEL, weights=str(weights_file), batch_size=16))
    return out, result


def independent_features(weights_file, images: list[np.ndarray]) -> np.ndarray:
    """model(x) with num_classes=0 (forward_features + pooling) on images resized and normalised here."""
    from safetensors.torch import load_file

    model = timm.create_model(MODEL, num_classes=0)
    model.load_state_dict(load_file(str(weights_file)))
    model.eval()
    batch = []
    for image in images:  # (H, W, 3) uint8 -> shorter side bicubic to 32, centre 32x32 (crop_pct 1) -> normalised
        height, width = image.shape[:2]
        size = (int(32 * width / height), 32) if width >= height else (32, int(32 * height / width))
        resized = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC), dtype=np.float64) / 255.0
        top, left = round((resized.shape[0] - 32) / 2), round((resized.shape[1] - 32) / 2)
        resized = resized[top:top + 32, left:left + 32]
        batch.append(((resized - MEAN) / STD).transpose(2, 0, 1))
    with torch.no_grad():
        return model(torch.tensor(np.stack(batch), dtype=torch.float32)).numpy()


def test_each_slide_gets_an_h5_file_in_the_clam_layout_readable_by_h5py(slide_features, tiles_dir):
    out, result = slide_features
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["slides"] == sorted([NORMAL_SLIDE, TUMOR_SLIDE]) and manifest["dim"] == DIM
    assert sorted(result.computed) == sorted([NORMAL_SLIDE, TUMOR_SLIDE])
    for slide in (TUMOR_SLIDE, NORMAL_SLIDE):
        table = pd.read_parquet(formats.TilePaths(tiles_dir).table(slide))
        with h5py.File(out / f"{slide}.h5", "r") as handle:
            features, coords = handle["features"][()], handle["coords"][()]
            labels = [v.decode() for v in handle["labels"][()]]
            attrs = dict(handle.attrs)
        assert features.dtype == np.float32 and features.shape == (len(table), DIM)
        assert coords.dtype == np.int64 and coords.shape == (len(table), 2)
        np.testing.assert_array_equal(coords, table[["x", "y"]].to_numpy())
        assert labels == table["label"].fillna("").astype(str).tolist()
        assert attrs["slide"] == slide and attrs["backbone"] == MODEL and attrs["tile_size_level0"] == TILE_SPAN
        assert attrs["patient_id"] == str(table["patient_id"].iloc[0])
        assert json.loads(attrs["preprocessing"])["input_size"] == [3, 32, 32]
        assert np.isfinite(features).all() and features.std() > 0


def test_slide_features_equal_the_backbone_output_on_independently_preprocessed_tiles(slide_features, tiles_dir, weights_file):
    from histotoken.data import wsi

    out, _ = slide_features
    table = pd.read_parquet(formats.TilePaths(tiles_dir).table(TUMOR_SLIDE))
    rows = [0, 3, len(table) - 1]
    images = [wsi.read_tile(table.iloc[row]).permute(1, 2, 0).numpy() for row in rows]
    expected = independent_features(weights_file, images)
    with h5py.File(out / f"{TUMOR_SLIDE}.h5", "r") as handle:
        stored = handle["features"][rows]
    np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-4)


def test_a_second_run_reuses_every_file_and_a_deleted_slide_is_recomputed_alone(slide_features, tiles_dir, weights_file):
    out, _ = slide_features
    files = {slide: out / f"{slide}.h5" for slide in (TUMOR_SLIDE, NORMAL_SLIDE)}
    before = {slide: path.stat().st_mtime_ns for slide, path in files.items()}
    again = embed(tiles_dir, out, EmbedSettings(MODEL, weights=str(weights_file), batch_size=16))
    assert again.computed == [] and sorted(again.reused) == sorted(files)
    assert {slide: path.stat().st_mtime_ns for slide, path in files.items()} == before
    kept = h5py.File(files[NORMAL_SLIDE], "r")["features"][()]
    files[TUMOR_SLIDE].unlink()
    resumed = embed(tiles_dir, out, EmbedSettings(MODEL, weights=str(weights_file), batch_size=16))
    assert resumed.computed == [TUMOR_SLIDE] and resumed.reused == [NORMAL_SLIDE]
    assert files[NORMAL_SLIDE].stat().st_mtime_ns == before[NORMAL_SLIDE]
    assert files[TUMOR_SLIDE].is_file() and not list(out.glob("*.tmp"))
    np.testing.assert_array_equal(h5py.File(files[NORMAL_SLIDE], "r")["features"][()], kept)


def test_another_backbone_into_the_same_folder_is_refused(slide_features, tiles_dir):
    out, _ = slide_features
    with pytest.raises(ValueError, match="another backbone"):
        embed(tiles_dir, out, EmbedSettings(MODEL, img_size=None, batch_size=16, merge_r=2))


def test_image_set_features_are_keyed_like_the_index(synthetic_root, weights_file, tmp_path):
    out = tmp_path / "features"
    embed(synthetic_root, out, EmbedSettings(MODEL, weights=str(weights_file)))
    index = load_index(synthetic_root).frame
    with h5py.File(out / "features.h5", "r") as handle:
        keys = [v.decode() for v in handle["keys"][()]]
        labels = [v.decode() for v in handle["labels"][()]]
        patients = [v.decode() for v in handle["patient_id"][()]]
        magnification = handle["magnification"][()]
        features = handle["features"][()]
    assert keys == index["path"].tolist() and labels == index["label"].tolist()
    assert patients == index["patient_id"].astype(str).tolist()
    np.testing.assert_array_equal(magnification, index["magnification"].to_numpy())
    assert features.shape == (len(index), DIM) and features.dtype == np.float32
    first = np.asarray(Image.open(keys[0]).convert("RGB"))
    np.testing.assert_allclose(features[:1], independent_features(weights_file, [first]), rtol=1e-4, atol=1e-4)


def test_merging_nothing_gives_cosine_one_and_merging_some_gives_a_similarity_in_0_1():
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=0).eval()
    images = torch.randn(6, 3, 32, 32)
    none = compare_merging(model, images, 0)
    assert abs(none["cosine_similarity"] - 1.0) < 1e-5
    some = compare_merging(model, images, 8)
    assert 0.0 <= some["cosine_similarity"] <= 1.0 and some["tiles_per_s_merged"] > 0
    assert model.merge_r == 8  # the backbone is left merged for the extraction


def test_embed_command_with_merge_r_prints_speed_and_similarity(synthetic_root, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["embed", str(synthetic_root), "--model", MODEL, "--merge-r", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "token merging r=4" in printed and "merged vs" in printed and "cosine similarity" in printed
    merge = json.loads((out / "manifest.json").read_text())["merge"]
    assert merge["r"] == 4 and 0.0 <= merge["cosine_similarity"] <= 1.0


def test_pretrained_offline_fails_fast_naming_the_weights_file_alternative(synthetic_root, tmp_path, capsys, monkeypatch):
    from histotoken.models import pretrained

    monkeypatch.setattr(pretrained, "hub_reachable", lambda timeout=3.0: False)
    code = main(["embed", str(synthetic_root), "--model", "resnet18", "--pretrained", "--out", str(tmp_path / "f")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "--weights FILE" in error and len(error.splitlines()) == 1


def test_an_image_set_is_reused_until_its_index_changes(tmp_path):
    from tests.conftest import write_png

    root = tmp_path / "folder"
    for name in ("benign", "malignant"):
        for i in range(3):
            write_png(root / name / f"{name}_{i}.png", size=(40, 30))
    out = tmp_path / "features"
    first = embed(root, out, EmbedSettings(MODEL))
    mtime = (out / "features.h5").stat().st_mtime_ns
    assert first.computed == ["features"] and embed(root, out, EmbedSettings(MODEL)).computed == []
    assert (out / "features.h5").stat().st_mtime_ns == mtime
    write_png(root / "malignant" / "malignant_3.png", size=(40, 30))
    assert embed(root, out, EmbedSettings(MODEL)).computed == ["features"]
    with h5py.File(out / "features.h5", "r") as handle:
        keys = [v.decode() for v in handle["keys"][()]]
    assert len(keys) == 7 and any(key.endswith("malignant_3.png") for key in keys)


def test_slide_feature_rows_are_addressed_by_the_tile_index_keys(slide_features, tiles_dir):
    from histotoken.features.store import keyed_features

    out, _ = slide_features
    keys, matrix = keyed_features(out)
    index = load_index(tiles_dir).frame  # labelled tiles only: every one of them has a feature row
    assert set(index["path"]) <= set(keys) and len(keys) == len(matrix)
    row = list(keys).index(index["path"].iloc[5])
    slide, tile = index["path"].iloc[5].rsplit("#", 1)
    with h5py.File(out / f"{slide.rsplit('/', 1)[1].removesuffix('.parquet')}.h5", "r") as handle:
        np.testing.assert_array_equal(matrix[row], handle["features"][int(tile)])


def test_merged_tile_extraction_records_the_comparison_and_differs_from_unmerged(slide_features, tiles_dir, weights_file, tmp_path):
    out, _ = slide_features
    merged_out = tmp_path / "merged"
    result = embed(tiles_dir, merged_out, EmbedSettings(MODEL, weights=str(weights_file), merge_r=8, merge_sample=8))
    assert result.merge["sample"] == 8 and 0.0 <= result.merge["cosine_similarity"] <= 1.0
    assert json.loads((merged_out / "manifest.json").read_text())["merge_r"] == 8
    with h5py.File(merged_out / f"{TUMOR_SLIDE}.h5", "r") as merged, h5py.File(out / f"{TUMOR_SLIDE}.h5", "r") as plain:
        assert merged["features"].shape == plain["features"].shape
        assert not np.allclose(merged["features"][()], plain["features"][()])  # merging changed the features
        np.testing.assert_array_equal(merged["coords"][()], plain["coords"][()])


def test_a_real_tissue_slide_is_tiled_and_embedded_tile_for_tile(weights_file, tmp_path):
    """Real stained tissue (scikit-image's immunohistochemistry() sample, colonic glands) laid into glass as a
    pyramidal slide: every kept tile gets one feature row, row i is the backbone's output on the pixels OpenSlide
    itself reads at coords[i] (not histotoken's reader), and tissue features differ between tiles."""
    import openslide
    from skimage import data

    from histotoken.data.wsi.synthetic import write_image_slide

    rng = np.random.default_rng(0)
    slide = np.clip(np.asarray((236, 234, 228)) + rng.normal(0, 2.5, size=(1024, 1024, 3)), 0, 255).astype(np.uint8)
    slide[256:768, 256:768] = data.immunohistochemistry()
    path = write_image_slide(tmp_path / "ihc.tif", slide, mpp=1.0, levels=4)
    tiles = tmp_path / "tiles"
    tile_slides(slide_jobs([path]), tiles, TilingSettings(tile_size=32, resolution=Resolution(2.0, "mpp")))
    table = pd.read_parquet(formats.TilePaths(tiles).table("ihc"))
    assert len(table) >= 40  # the 512 um photograph holds 64 tiles of 64 um; glass holds none
    assert table["x"].between(256 - 64, 768).all() and table["y"].between(256 - 64, 768).all()

    out = tmp_path / "features"
    embed(tiles, out, EmbedSettings(MODEL, weights=str(weights_file), batch_size=16))
    with h5py.File(out / "ihc.h5", "r") as handle:
        features, coords = handle["features"][()], handle["coords"][()]
    assert features.shape == (len(table), DIM)
    np.testing.assert_array_equal(coords, table[["x", "y"]].to_numpy())
    rows = [0, len(table) // 2, len(table) - 1]
    with openslide.OpenSlide(str(path)) as reader:
        images = []
        for row in rows:
            tile = table.iloc[row]
            size = int(tile["read_size"])
            region = reader.read_region((int(tile["x"]), int(tile["y"])), int(tile["level"]), (size, size))
            image = region.convert("RGB").resize((32, 32), Image.BILINEAR) if size != 32 else region.convert("RGB")
            images.append(np.asarray(image))
    np.testing.assert_allclose(features[rows], independent_features(weights_file, images), rtol=1e-4, atol=1e-4)
    spread = np.linalg.norm(features - features.mean(axis=0), axis=1)
    assert spread.max() > 10 * 1e-4 * np.linalg.norm(features, axis=1).mean()  # features depend on the tissue
