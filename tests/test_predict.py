"""histotoken predict: one CSV row per image, errors as rows, and dihedral test-time augmentation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from histotoken.engine.predict import collect_inputs, predict_images, split_slides
from tests.run_fixture import make_run, write_image

CLASSES = ("benign", "malignant", "other")
IMG = 32


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("predict") / "run", "resnet18", CLASSES, IMG)


def test_csv_has_one_row_per_image_and_a_row_for_an_unreadable_one(run_dir, tmp_path, capsys):
    from histotoken.cli.main import main

    folder = tmp_path / "images"
    write_image(folder / "a.png", seed=1)
    write_image(folder / "nested" / "b.jpg", seed=2)
    (folder / "broken.png").write_bytes(b"not an image at all")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(run_dir), str(folder), "--out", str(out), "--batch-size", "2"]) == 0
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["path", "predicted_class", *[f"prob/{c}" for c in CLASSES], "error"]
    assert [p.split("images/")[1] for p in table["path"]] == ["a.png", "broken.png", "nested/b.jpg"]
    broken = table[table["path"].str.endswith("broken.png")].iloc[0]
    assert "cannot decode image" in broken["error"] and broken["predicted_class"] == ""
    scored = table[table["error"] == ""]
    probabilities = scored[[f"prob/{c}" for c in CLASSES]].astype(float).to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert list(scored["predicted_class"]) == [CLASSES[i] for i in probabilities.argmax(axis=1)]
    assert "2 images scored" in capsys.readouterr().out


def test_predictions_equal_the_model_on_the_decoded_image(run_dir, tmp_path):
    from histotoken.data.dataset import load_image
    from histotoken.data.transforms import model_normalisation
    from histotoken.engine.evaluate import load_best_model

    path = write_image(tmp_path / "one.png", seed=3, size=(70, 46))
    table = predict_images(run_dir, [path])
    model, _ = load_best_model(run_dir)
    mean, std = model_normalisation(model)
    image = load_image(str(path), IMG).float() / 255.0
    normalised = (image - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        expected = torch.softmax(model(normalised[None]), dim=1)[0].numpy()
    np.testing.assert_allclose(table[[f"prob/{c}" for c in CLASSES]].to_numpy()[0], expected, atol=1e-5)


def test_tta_gives_one_distribution_per_image_that_rotation_and_flip_do_not_change(run_dir, tmp_path):
    from PIL import Image

    original = write_image(tmp_path / "square.png", seed=4, size=(IMG, IMG))
    pixels = np.asarray(Image.open(original))
    turned = tmp_path / "turned.png"
    Image.fromarray(np.ascontiguousarray(np.rot90(pixels)[:, ::-1])).save(turned)  # rotated, then mirrored
    columns = [f"prob/{c}" for c in CLASSES]
    with_tta = predict_images(run_dir, [original, turned], tta=True)[columns].to_numpy()
    assert with_tta.shape == (2, len(CLASSES))
    np.testing.assert_allclose(with_tta.sum(axis=1), 1.0, atol=1e-5)
    # the 8 views form a group: an image and its rotated mirror image see the same 8 views
    np.testing.assert_allclose(with_tta[0], with_tta[1], atol=1e-5)
    without = predict_images(run_dir, [original, turned])[columns].to_numpy()
    assert not np.allclose(without[0], without[1], atol=1e-5)  # a plain model is not invariant


def test_tta_is_one_prediction_pass_equal_to_the_mean_of_the_8_views_scored_alone(run_dir, tmp_path, monkeypatch):
    import lightning
    from PIL import Image

    original = write_image(tmp_path / "square.png", seed=5, size=(IMG, IMG))
    # the 8 elements of the dihedral group, made by PIL and each scored as its own image without TTA
    pil_views = [None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270,
                 Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.TRANSPOSE,
                 Image.Transpose.TRANSVERSE]
    view_files = []
    for index, operation in enumerate(pil_views):
        image = Image.open(original)
        (image if operation is None else image.transpose(operation)).save(tmp_path / f"view{index}.png")
        view_files.append(tmp_path / f"view{index}.png")
    columns = [f"prob/{c}" for c in CLASSES]
    single_views = predict_images(run_dir, view_files)[columns].to_numpy()  # (8, C)
    assert len({tuple(np.round(row, 6)) for row in single_views}) > 1  # the views do differ for this model

    built = []

    class CountingTrainer(lightning.Trainer):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(lightning, "Trainer", CountingTrainer)
    with_tta = predict_images(run_dir, [original], tta=True)[columns].to_numpy()[0]
    assert len(built) == 1  # one Trainer (one pass) for all 8 views, not one per view
    np.testing.assert_allclose(with_tta, single_views.mean(axis=0), atol=1e-5)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect_inputs([tmp_path / "nowhere.png"])


def test_flat_tiff_is_an_image_and_pyramidal_tiff_or_svs_a_slide(tmp_path):
    from histotoken.data.wsi.synthetic import write_slide

    flat = write_image(tmp_path / "flat.tif", seed=5)
    pyramid = write_slide(tmp_path / "pyramid.tif", [], (512, 512), levels=2, tile=128)
    svs = tmp_path / "case.svs"
    svs.write_bytes(b"")
    images, slides = split_slides([flat, pyramid, svs])
    assert images == [flat] and slides == [pyramid, svs]
