"""Every bad input gets a clear message naming the file or value and the fix."""

import logging
import shutil

import pytest
import torch

from histotoken.cli.main import main
from histotoken.config import RunConfig
from histotoken.data.dataset import load_image
from histotoken.engine.evaluate import evaluate_run
from histotoken.engine.fit import train
from histotoken.models.factory import create_model, load_weights
from tests.conftest import write_png


def tiny(root, **changes):
    values = dict(data=str(root), model="resnet18", task="binary", train_domain="100", img_size=32,
                  epochs=1, batch_size=16, precision="32-true", bootstrap=100)
    return RunConfig(**{**values, **changes})


def test_grayscale_and_rgba_images_are_converted_with_a_warning(tmp_path, caplog):
    gray = write_png(tmp_path / "gray.png", mode="L")
    rgba = write_png(tmp_path / "rgba.png", mode="RGBA")
    with caplog.at_level(logging.WARNING):
        assert load_image(str(gray), 16).shape == (3, 16, 16)
        assert load_image(str(rgba), 16).shape == (3, 16, 16)
    assert "gray.png is a grayscale image" in caplog.text
    assert "rgba.png is a RGBA image" in caplog.text


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + b"x" * 50])
def test_unreadable_image_error_names_the_file(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="broken.png"):
        load_image(str(path), 16)


def test_image_that_breaks_after_indexing_is_skipped_and_listed(synthetic_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    train(tiny(data, epochs=1), tmp_path / "first")  # makes the split
    import pandas as pd

    split = pd.read_csv(tmp_path / "first" / "splits.csv")
    victim = split[(split.split == "train") & (split.magnification == 100)].iloc[0]["path"]
    open(victim, "wb").close()  # the file is emptied after the split was made
    train(tiny(data, splits=str(tmp_path / "first" / "splits.csv")), tmp_path / "second")
    skipped = pd.read_csv(tmp_path / "second" / "skipped_images.csv")
    assert list(skipped["path"]) == [victim]


def test_unknown_model_name_is_refused_with_suggestions(synthetic_root, tmp_path):
    with pytest.raises(ValueError, match="unknown model 'resnet1800'.*resnet18"):
        train(tiny(synthetic_root, model="resnet1800"), tmp_path / "run")


def test_domain_without_images_is_refused(tmp_path):
    from histotoken.data.synthetic import generate_synthetic_breakhis

    root = tmp_path / "only100"
    generate_synthetic_breakhis(root, patients_per_class=3, images_per_patient=1, magnifications=(100,), size=(32, 24))
    with pytest.raises(ValueError, match="domain 400 has no images"):
        train(tiny(root, train_domain="400"), tmp_path / "run")


def test_checkpoint_from_another_model_is_refused_on_evaluate(synthetic_root, tmp_path):
    train(tiny(synthetic_root), tmp_path / "a")
    train(tiny(synthetic_root, task="subtype"), tmp_path / "b")
    # copy run b's weights (8 classes) over run a's (2 classes)
    shutil.copy(tmp_path / "b" / "checkpoints" / "best.safetensors", tmp_path / "a" / "checkpoints" / "best.safetensors")
    with pytest.raises(ValueError, match="does not fit model resnet18 with 2 classes"):
        evaluate_run(tmp_path / "a", "100", n_bootstrap=0)


def test_weights_file_of_another_architecture_is_refused(tmp_path):
    from safetensors.torch import save_file

    other = create_model("vit_tiny_patch16_224", num_classes=2, img_size=32)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "vit.safetensors")
    with pytest.raises(ValueError, match="matches none of the parameters"):
        create_model("resnet18", num_classes=2, weights=tmp_path / "vit.safetensors")


def test_weights_with_another_class_count_load_all_but_the_classifier(tmp_path):
    from safetensors.torch import save_file

    source = create_model("resnet18", num_classes=8)
    save_file(source.state_dict(), tmp_path / "r18.safetensors")
    model = create_model("resnet18", num_classes=2, weights=tmp_path / "r18.safetensors")
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 2


def test_missing_weights_file_names_it():
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_weights(torch.nn.Linear(2, 2), "nope.safetensors")


def test_pretrained_without_network_fails_fast_with_advice():
    # This machine has no route to the hub: the error must come at once and name the offline way.
    with pytest.raises(ValueError, match="--weights FILE"):
        create_model("resnet18", num_classes=2, pretrained=True)


def test_cli_prints_one_line_errors_not_tracebacks(tmp_path, capsys):
    status = main(["index", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2
    assert "does not look like BreakHis" in err and "Traceback" not in err


def test_evaluate_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), "--domain", "100"]) == 2
    assert "is not a run folder" in capsys.readouterr().err
