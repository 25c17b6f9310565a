"""Stain normalisation (torchstain Macenko/Reinhard), HED stain jitter and stain grid factors."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from histotoken.data.stain import (
    StainNormaliser,
    make_stain_normaliser,
    run_stain_normaliser,
    saved_stain_normaliser,
)
from histotoken.data.synthetic import render_image
from histotoken.data.transforms import RandomHEDJitter, hed_jitter, train_transform
from histotoken.formats import RunPaths
from histotoken.io import read_json


def synthetic_he(patient_id: str, tumor_class: str = "ductal_carcinoma", size=(128, 96)) -> torch.Tensor:
    """A synthetic H&E field; the generator draws each patient's stain vectors from the patient id."""
    image = render_image(tumor_class, 100, size, seed=0, patient_index=0, patient_id=patient_id, seq=1)
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


def write_png(image: torch.Tensor, path) -> str:
    from torchvision.io import write_png as torchvision_write_png

    torchvision_write_png(image, str(path))
    return str(path)


def macenko_stain_vectors(image: torch.Tensor) -> torch.Tensor:
    """(3, 2) haematoxylin and eosin optical-density vectors fitted by a fresh torchstain normaliser."""
    import torchstain

    fitted = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    fitted.fit(image)
    return fitted.HERef


def angles_degrees(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    cosines = torch.nn.functional.cosine_similarity(a, b, dim=0).clamp(-1, 1)
    return [math.degrees(math.acos(float(c))) for c in cosines]


def test_macenko_maps_the_stain_vectors_of_another_patient_onto_the_targets(tmp_path):
    # One tissue field drawn twice: the generator takes the stain from the patient id alone, so the
    # two images differ only in their stains.
    target = synthetic_he("14-10001", "fibroadenoma")
    source = synthetic_he("14-20000", "fibroadenoma")
    normaliser, _ = make_stain_normaliser("macenko", write_png(target, tmp_path / "target.png"))
    normalised = normaliser(source)
    target_vectors = macenko_stain_vectors(target)
    before = angles_degrees(macenko_stain_vectors(source), target_vectors)
    after = angles_degrees(macenko_stain_vectors(normalised), target_vectors)
    assert normalised.shape == source.shape and normalised.dtype == torch.uint8
    assert max(before) > 3.0  # the haematoxylin vectors of the two patients differ by several degrees
    assert max(after) < 1.0  # haematoxylin and eosin now point where the target's do
    distance_before = (source.float() - target.float()).abs().mean()
    distance_after = (normalised.float() - target.float()).abs().mean()
    assert distance_after < 0.75 * distance_before  # and the colours moved towards the target's


def test_reinhard_matches_the_targets_lab_statistics(tmp_path):
    import torchstain

    target = synthetic_he("14-10001", "fibroadenoma")
    source = synthetic_he("14-20000", "fibroadenoma")
    normaliser, _ = make_stain_normaliser("reinhard", write_png(target, tmp_path / "target.png"))
    statistics = []
    for image in (target, source, normaliser(source)):
        fitted = torchstain.normalizers.ReinhardNormalizer(backend="torch")
        fitted.fit(image)
        statistics.append(torch.cat([fitted.target_means, fitted.target_stds]))
    target_stats, source_stats, normalised_stats = statistics
    assert (normalised_stats - target_stats).abs().max() < 1.0  # LAB units (L 0-100)
    assert (source_stats - target_stats).abs().max() > 2.0


def blank_tile() -> torch.Tensor:
    blank = torch.full((3, 40, 40), 244, dtype=torch.uint8)
    blank[:, :4, :4] = 120  # a speck of something, far below the tissue share needed for a fit
    return blank


def grey_tissue() -> torch.Tensor:
    """Tissue without colour (a greyscale scan converted to RGB): one stain direction, flat LAB a/b."""
    return synthetic_he("14-10001", size=(40, 40)).float().mean(dim=0).round().to(torch.uint8).expand(3, -1, -1)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
@pytest.mark.parametrize("make_image", [blank_tile, grey_tissue])
def test_unfittable_image_is_left_unchanged_with_a_warning_naming_it(tmp_path, caplog, method, make_image):
    normaliser, _ = make_stain_normaliser(method, write_png(synthetic_he("14-10001"), tmp_path / "target.png"))
    image = make_image().contiguous()
    with caplog.at_level(logging.WARNING, logger="histotoken.data.stain"):
        result = normaliser.normalise_or_keep(image, "slides/odd_tile.png")
    assert torch.equal(result, image)
    assert "slides/odd_tile.png" in caplog.text


def test_store_normalises_tissue_and_keeps_a_blank_tile_with_a_warning_naming_it(tmp_path, caplog):
    import pandas as pd

    from histotoken.data.dataset import ImageStore, load_image

    tissue = write_png(synthetic_he("14-20000", "fibroadenoma", size=(48, 40)), tmp_path / "tissue.png")
    blank = write_png(torch.full((3, 40, 48), 243, dtype=torch.uint8), tmp_path / "blank_tile.png")
    normaliser, key = make_stain_normaliser("macenko", write_png(synthetic_he("14-10001"), tmp_path / "target.png"))
    frame = pd.DataFrame({"path": [tissue, blank]})
    with caplog.at_level(logging.WARNING):
        store = ImageStore.build(frame, 32, preprocess=normaliser, preprocess_key=key, cache_dir=tmp_path / "stores")
    assert len(store.frame) == 2 and not store.skipped  # the blank tile is kept, not dropped
    assert torch.equal(store.images[1], load_image(blank, 32))
    assert torch.equal(store.images[0], normaliser(load_image(tissue, 32)))
    assert not torch.equal(store.images[0], load_image(tissue, 32))
    assert "blank_tile.png" in caplog.text and "tissue.png" not in caplog.text


def test_blank_target_is_refused_naming_the_file(tmp_path):
    path = write_png(torch.full((3, 32, 32), 250, dtype=torch.uint8), tmp_path / "white.png")
    with pytest.raises(ValueError, match="white.png"):
        make_stain_normaliser("macenko", path)


def test_vahadane_gives_a_clear_error_while_torchstain_lacks_it(tmp_path):
    path = write_png(synthetic_he("14-10001", size=(32, 32)), tmp_path / "target.png")
    with pytest.raises(ValueError, match="vahadane.*macenko or reinhard"):
        make_stain_normaliser("vahadane", path)


def test_missing_target_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.png"):
        make_stain_normaliser("macenko", tmp_path / "no_such.png")


def test_cache_key_names_the_method_and_changes_with_the_target(tmp_path):
    first = write_png(synthetic_he("14-10001", size=(48, 48)), tmp_path / "a.png")
    second = write_png(synthetic_he("14-20004", size=(48, 48)), tmp_path / "b.png")
    _, macenko_a = make_stain_normaliser("macenko", first)
    _, macenko_a_again = make_stain_normaliser("macenko", first)
    _, macenko_b = make_stain_normaliser("macenko", second)
    _, reinhard_a = make_stain_normaliser("reinhard", first)
    assert macenko_a == macenko_a_again and macenko_a.startswith("macenko")
    assert len({macenko_a, macenko_b, reinhard_a}) == 3


def test_run_folder_keeps_the_target_and_its_stain_matrix(tmp_path):
    target = synthetic_he("14-10001", size=(64, 48))
    original = write_png(target, tmp_path / "elsewhere.png")
    run_dir = tmp_path / "run"
    normaliser, key = run_stain_normaliser("macenko", original, run_dir)
    paths = RunPaths(run_dir)
    saved = read_json(paths.stain)
    assert saved["method"] == "macenko" and saved["key"] == key
    assert torch.allclose(torch.tensor(saved["stain_matrix_he"]), macenko_stain_vectors(target), atol=1e-5)
    # A resumed run or an evaluation refits on the saved copy, even once the original is gone.
    (tmp_path / "elsewhere.png").unlink()
    again, again_key = run_stain_normaliser("macenko", None, run_dir)
    assert paths.stain_target.is_file() and again_key == key
    source = synthetic_he("14-20004", size=(64, 48))
    assert torch.equal(again(source), normaliser(source))


def test_evaluation_finds_the_normaliser_a_run_trained_with(tmp_path):
    run_dir = tmp_path / "run"
    target = write_png(synthetic_he("14-10001", size=(64, 48)), tmp_path / "target.png")
    _, key = run_stain_normaliser("reinhard", target, run_dir)
    normaliser, saved_key = saved_stain_normaliser(run_dir)
    assert saved_key == key and normaliser.method == "reinhard"
    RunPaths(run_dir).stain_target.unlink()
    with pytest.raises(FileNotFoundError, match="stain_target.png"):
        saved_stain_normaliser(run_dir)


def test_no_stain_normalisation_needs_no_target(tmp_path):
    assert run_stain_normaliser("none", None, tmp_path) == (None, "")
    assert saved_stain_normaliser(tmp_path) == (None, "")
    assert not RunPaths(tmp_path).stain.exists()


def test_normaliser_survives_pickling_for_worker_processes(tmp_path):
    import pickle

    normaliser = StainNormaliser("macenko", synthetic_he("14-10001", size=(48, 48)))
    copy = pickle.loads(pickle.dumps(normaliser))
    source = synthetic_he("14-20004", size=(48, 48))
    assert copy.key == normaliser.key and torch.equal(copy(source), normaliser(source))


def test_hed_jitter_with_zero_sigma_is_the_identity():
    image = torch.randint(0, 256, (3, 24, 20), dtype=torch.uint8)
    image[:, :4] = synthetic_he("14-10001", size=(20, 4))
    assert torch.equal(RandomHEDJitter(scale_sigma=0.0, shift_sigma=0.0)(image), image)


def test_hed_jitter_changes_colour_but_keeps_shape_and_dtype():
    torch.manual_seed(0)
    image = synthetic_he("14-10001", size=(32, 24))
    jittered = [RandomHEDJitter()(image) for _ in range(3)]
    for result in jittered:
        assert result.shape == image.shape and result.dtype == torch.uint8
        assert (result.int() - image.int()).abs().float().mean() > 0.5
    assert not torch.equal(jittered[0], jittered[1])  # a new draw per call


@pytest.mark.parametrize("channel", [0, 1, 2])
def test_hed_jitter_changes_only_the_chosen_stain_as_scikit_image_measures_it(channel):
    from skimage.color import rgb2hed

    image = torch.tensor([150, 90, 140], dtype=torch.uint8).reshape(3, 1, 1).expand(3, 4, 4).contiguous()
    scale, shift = torch.ones(3), torch.zeros(3)
    scale[channel], shift[channel] = 1.3, 0.05
    result = hed_jitter(image, scale, shift)
    # scikit-image's HED amounts are optical density / ln(1e6), all positive for this purple pixel.
    before = torch.tensor(rgb2hed(image.permute(1, 2, 0).numpy()).mean(axis=(0, 1))) * math.log(1e6)
    after = torch.tensor(rgb2hed(result.permute(1, 2, 0).numpy()).mean(axis=(0, 1))) * math.log(1e6)
    expected = before.clone()
    expected[channel] = before[channel] * 1.3 + 0.05
    assert (before > 0).all()
    assert torch.allclose(after, expected, atol=0.02)  # within uint8 rounding


def test_train_transform_with_hed_keeps_the_output_contract():
    transform = train_transform(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), stain_augment="hed")
    assert any(isinstance(step, RandomHEDJitter) for step in transform.transforms)
    output = transform(synthetic_he("14-10001", size=(48, 40)))
    assert output.shape == (3, 32, 32) and output.dtype == torch.float32
    with pytest.raises(ValueError, match="stain_augment"):
        train_transform(32, (0.5,) * 3, (0.25,) * 3, stain_augment="hsv")


def test_spec_with_a_stain_norm_factor_expands_into_runs_with_distinct_ids(tmp_path):
    from histotoken.experiments.spec import expand, spec_from_dict

    raw = {
        "data": str(tmp_path), "models": ["resnet18"], "train_domains": ["100", "400"], "seeds": [0, 1],
        "protocol": {"stain_target": str(tmp_path / "target.png")},
        "factors": {"stain_norm": ["none", "macenko"], "stain_augment": ["hed"]},
    }
    spec = spec_from_dict(raw, "study.yaml")
    runs = expand(spec)
    assert len(runs) == 2 * 2 * 2 and len({run.run_id for run in runs}) == len(runs)
    macenko = [run for run in runs if "stain_norm-macenko" in run.run_id]
    assert len(macenko) == 4 and not any("stain_augment" in run.run_id for run in runs)  # only varying factors
    config = macenko[0].config(spec, tmp_path / "splits.csv")
    assert (config.stain_norm, config.stain_augment, config.stain_target) == (
        "macenko", "hed", str(tmp_path / "target.png"),
    )
    # study tables keep the arms apart by label; the model part of the label finds its efficiency row
    from histotoken.experiments.spec import model_label

    assert {run.label(spec) for run in runs} == {"resnet18 [stain_norm=none]", "resnet18 [stain_norm=macenko]"}
    assert {model_label(run.label(spec)) for run in runs} == {"resnet18"}


@pytest.mark.parametrize(
    ("factors", "message"),
    [
        ({"stain_norm": ["none", "macenko"]}, "stain-target"),  # no target in the protocol
        ({"stain_norm": ["none", "fancy"]}, "stain_norm must be one of"),
        ({"seed": [0, 1]}, "grid sets it per run"),
        ({"stain_norm": []}, "at least one value"),
    ],
)
def test_spec_factor_errors_name_the_file(tmp_path, factors, message):
    from histotoken.experiments.spec import spec_from_dict

    raw = {"data": str(tmp_path), "models": ["resnet18"], "train_domains": ["100"], "factors": factors}
    with pytest.raises(ValueError, match=message) as error:
        spec_from_dict(raw, "study.yaml")
    assert "study.yaml" in str(error.value)


def test_training_with_stain_normalisation_keeps_the_target_and_builds_a_normalised_store(synthetic_root, tmp_path):
    import json

    from histotoken.config import RunConfig
    from histotoken.data.index import cache_dir
    from histotoken.engine.fit import train

    target = sorted(synthetic_root.rglob("*-100-*.png"))[0]
    config = RunConfig(
        data=str(synthetic_root), model="resnet18", task="binary", train_domain="100", img_size=32, epochs=1,
        batch_size=16, precision="32-true", bootstrap=0,
        stain_norm="macenko", stain_target=str(target), stain_augment="hed",
    )
    train(config, tmp_path / "run", progress_bar=False)
    paths = RunPaths(tmp_path / "run")
    saved = read_json(paths.stain)
    assert saved["method"] == "macenko" and saved["target_source"] == str(target.resolve())
    assert paths.stain_target.is_file()
    manifests = [json.loads(path.read_text()) for path in (cache_dir() / "stores").glob("*.json")]
    assert any(manifest.get("preprocess_key") == saved["key"] for manifest in manifests)
