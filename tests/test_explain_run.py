"""`histotoken explain` on a finished tiny run: faithfulness against random orders, every figure, the report."""

from __future__ import annotations

import json
import shutil

import pytest

from histotoken.config import RunConfig
from histotoken.engine.fit import train
from histotoken.explain.run import explain_run
from histotoken.reporting import build_report
from tests.study_fixture import MODELS, run_id_of, write_study

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained_run(learnable_root, tmp_path_factory):
    """resnet18 trained for a few epochs on the learnable synthetic set at 32 px (fixed seed and data).

    Six epochs: with fewer, the best checkpoint (by validation macro-F1) is an epoch-1 model whose
    probabilities barely move when patches are blurred, so its curves cannot tell maps apart.
    """
    run = tmp_path_factory.mktemp("explain") / "run"
    config = RunConfig(data=str(learnable_root), model="resnet18", task="subtype", train_domain="100", img_size=32,
                       epochs=6, batch_size=16, lr=1e-3, precision="32-true", seed=0, bootstrap=0)
    train(config, run)
    return run


@pytest.fixture(scope="module")
def explained(trained_run):
    return explain_run(trained_run, "100", n=12, method="auto", seed=0)


def test_gradcam_deletion_auc_is_below_the_random_order_on_a_trained_model(explained):
    score = explained["faithfulness"]["gradcam"]
    assert explained["methods"] == ["gradcam"]
    assert score["deletion_auc"] < score["random_deletion_auc"]
    assert not score["no_better_than_random"]


def test_explanation_picks_correct_images_and_errors_and_records_timings(explained):
    assert explained["n_images"] == 12
    outcomes = {image["target"] == image["prediction"] for image in explained["images"]}
    assert outcomes == {True, False}  # both confident correct images and confident errors
    assert len({image["path"] for image in explained["images"]}) == 12
    assert {"load", "maps", "faithfulness", "tsne", "figures", "total"} <= set(explained["timing_s"])


def test_cli_explain_writes_every_figure_and_the_report_embeds_them(trained_run, tmp_path, monkeypatch, capsys):
    from histotoken.cli import main as cli_main

    monkeypatch.setattr(cli_main, "COMMANDS", ["explain"])
    assert cli_main.main(["explain", str(trained_run), "--domain", "400", "--n", "2", "--method", "all", "--steps", "6"]) == 0
    out_dir = trained_run / "explain" / "400"
    assert str(out_dir) in capsys.readouterr().out
    scores = json.loads((out_dir / "explain.json").read_text())
    assert set(scores["figures"]) == {"per_image", "outcomes_gradcam", "faithfulness", "tsne"}
    for name in scores["figures"].values():
        assert (out_dir / name).read_bytes()[:8] == PNG_SIGNATURE

    study = write_study(tmp_path / "study", models=MODELS[:1], train_domains=("100",), test_domains=("100",),
                        failed_run=None)
    shutil.copytree(trained_run / "explain", study / "runs" / run_id_of("resnet18", "100") / "explain")
    html = build_report(study).read_text(encoding="utf-8")
    markdown = (study / "report.md").read_text(encoding="utf-8")
    section = markdown.split("## What the models look at")[1].split("\n## ")[0]
    embedded = [name for name in (study / "figures").glob("explain_*.*")]  # PNG or JPEG
    assert len(embedded) == len(scores["figures"]) + 4  # the 400 explanation and the fixture's 100 one
    for path in embedded:
        assert f"](figures/{path.name})" in section
    assert html.count("How to read this:") == html.count("<img ")
    assert "| Grad-CAM |" in section and "random deletion AUC" in section


def test_explain_of_a_folder_without_checkpoint_is_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train it first"):
        explain_run(tmp_path, "100")


def test_grid_spec_explain_block_is_checked_and_explains_each_run_once(trained_run, tmp_path):
    from histotoken.experiments.spec import spec_from_dict
    from histotoken.explain.run import explain_after_evaluation

    raw = {"data": str(tmp_path), "models": ["resnet18"], "train_domains": ["100"]}
    assert spec_from_dict(raw, "s.yaml").explain == {}
    spec = spec_from_dict({**raw, "explain": {"n": 2, "domains": ["400"]}}, "s.yaml")
    assert spec.explain == {"enabled": True, "n": 2, "domains": ["400"]}
    assert "explain" in spec.to_dict()
    with pytest.raises(ValueError, match="unknown explain keys"):
        spec_from_dict({**raw, "explain": {"images": 2}}, "s.yaml")

    written = explain_after_evaluation(trained_run, {**spec.explain, "domains": ["100", "200"]}, "100")
    assert written == []  # 100 is already explained; 200 has no test images: logged, not raised
