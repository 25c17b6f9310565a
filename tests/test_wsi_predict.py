"""End to end on two generated slides: tile, train a tiny model a few steps, predict slides, heatmaps, metrics."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from histotoken import formats
from histotoken.data.wsi.dataset import TileDataset
from histotoken.data.wsi.reader import Resolution
from histotoken.data.wsi.tiling import TilingSettings, read_tile_tables, slide_jobs, tile_slides
from histotoken.engine.slides import predict_slides, slide_scores, tumor_class_index
from tests.slide_fixture import NORMAL_SLIDE, TILE_SIZE, TILE_SPAN, TUMOR_SLIDE, TUMOR_TILES, shared_slide_set

IMG_SIZE = 32


@pytest.fixture(scope="session")
def slide_set(tmp_path_factory):
    return shared_slide_set(tmp_path_factory)


def _train_run(tiles_dir, run_dir) -> None:
    """A few plain optimisation steps of a tiny Mixer on the tiles, saved as a run's best checkpoint."""
    from safetensors.torch import save_file

    from histotoken.data.transforms import model_normalisation
    from histotoken.models.factory import create_model

    torch.manual_seed(0)
    model = create_model("mixer_tiny", num_classes=2, img_size=IMG_SIZE)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in model_normalisation(model))
    data = TileDataset(read_tile_tables(tiles_dir), formats.TILE_CLASS_NAMES,
                       transform=lambda image: (image.float() / 255 - mean) / std, image_size=IMG_SIZE)
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    weight = torch.tensor([1.0, 4.0])  # 7 tumour tiles among 56
    model.train()
    for _ in range(6):
        for images, targets in loader:
            loss = torch.nn.functional.cross_entropy(model(images), targets, weight=weight)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    paths = formats.RunPaths(run_dir)
    paths.checkpoints.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(paths.best_weights))
    paths.best_meta.write_text(json.dumps({
        "model_name": "mixer_tiny", "model_kwargs": {}, "num_classes": 2, "class_names": list(formats.TILE_CLASS_NAMES),
        "task": "classes", "img_size": IMG_SIZE,
    }))
    paths.config.write_text(yaml.safe_dump({"data": str(tiles_dir), "seed": 0, "accelerator": "cpu",
                                            "precision": "32-true"}))


def test_tile_train_predict_heatmap_on_two_slides(slide_set, tmp_path):
    tiles_dir, run_dir, out = tmp_path / "tiles", tmp_path / "run", tmp_path / "predictions"
    settings = TilingSettings(tile_size=TILE_SIZE, resolution=Resolution(0.5, "mpp"))
    slides = [slide_set["tumour"], slide_set["normal"]]
    tile_slides(slide_jobs(slides, slide_set["annotations"], slide_set["labels"]), tiles_dir, settings)
    _train_run(tiles_dir, run_dir)

    result = predict_slides(run_dir, slides, out, annotations_dir=slide_set["annotations"],
                            labels_csv=slide_set["labels"], n_bootstrap=50, top_k=5, export_annotations="asap",
                            export_regions=True)

    scores = pd.read_csv(out / formats.SLIDE_SCORES).set_index("slide")
    assert list(scores.index) == [TUMOR_SLIDE, NORMAL_SLIDE]
    assert scores.loc[TUMOR_SLIDE, "score_max"] > scores.loc[NORMAL_SLIDE, "score_max"]
    assert scores.loc[TUMOR_SLIDE, "prediction"] == "tumor" and scores.loc[NORMAL_SLIDE, "prediction"] == "normal"
    tiles = pd.read_parquet(out / formats.SLIDE_PREDICTIONS_DIR / f"{TUMOR_SLIDE}.parquet")
    np.testing.assert_allclose(tiles["prob/normal"] + tiles["prob/tumor"], 1.0, rtol=1e-5)
    assert len(tiles) == 28  # the run's own tiling (its tile folder's tiling.json) was reused
    tumour = tiles[[(x, y) in TUMOR_TILES for x, y in zip(tiles["x"], tiles["y"])]]
    assert tumour["prob/tumor"].min() > tiles.drop(tumour.index)["prob/tumor"].max()
    from PIL import Image

    with Image.open(out / formats.SLIDE_HEATMAPS_DIR / f"{TUMOR_SLIDE}.png") as picture:
        assert picture.size == (64, 48)  # the tissue mask's resolution (8 um/px), read in bounded blocks
    _check_asap_export(out, tiles)
    evaluation = json.loads((out / formats.SLIDE_EVAL).read_text())
    assert evaluation == result["eval"]
    assert evaluation["n_slides"] == 2 and evaluation["accuracy"] == 1.0 and evaluation["auroc"] == 1.0
    assert evaluation["confusion_matrix"] == [[1, 0], [0, 1]]
    assert set(evaluation["ci95"]) >= {"accuracy", "macro_f1", "auroc"}
    assert evaluation["tile_level"]["n_images"] == 56 and evaluation["tile_level"]["auroc"] == 1.0

    # The same through `histotoken predict`, which sends slide files here.
    from histotoken.cli.main import main

    cli_out = tmp_path / "cli"
    assert main(["predict", str(run_dir), str(slide_set["normal"]), "--out", str(cli_out), "--bootstrap", "0",
                 "--export-annotations", "geojson"]) == 0
    cli_scores = pd.read_csv(cli_out / formats.SLIDE_SCORES)
    assert list(cli_scores["slide"]) == [NORMAL_SLIDE]
    assert cli_scores["score_max"].iloc[0] == pytest.approx(scores.loc[NORMAL_SLIDE, "score_max"], abs=1e-5)
    assert (cli_out / formats.SLIDE_HEATMAPS_DIR / f"{NORMAL_SLIDE}.png").is_file()
    # the slide report shows each heatmap beside the slide's tissue view, one self-contained page
    report = (cli_out / formats.REPORT_HTML).read_text()
    assert report.count("data:image/png;base64,") == 1 and NORMAL_SLIDE in report
    assert "No slide labels were given" in report  # no --labels here: no metrics, and it says so
    # the title names the run and the slide, not the output folder; no annotations, so no annotation heading
    assert f"<h1>Slide predictions of mixer_tiny (run run) on 1 slide: {NORMAL_SLIDE}</h1>" in report
    assert "Heatmaps next to the annotations" not in report and "at least 0.50" in report
    # QuPath GeoJSON: one level-0 square per tile of the tile table, at its x, y, 128 level-0 pixels wide
    from shapely.geometry import shape

    cli_tiles = pd.read_parquet(cli_out / formats.SLIDE_PREDICTIONS_DIR / f"{NORMAL_SLIDE}.parquet")
    features = json.loads((cli_out / "annotations" / f"{NORMAL_SLIDE}.geojson").read_text())["features"]
    assert len(features) == len(cli_tiles) == 28
    for feature, x, y, p in zip(features, cli_tiles["x"], cli_tiles["y"], cli_tiles["prob/tumor"]):
        assert shape(feature["geometry"]).bounds == (x, y, x + TILE_SPAN, y + TILE_SPAN)
        assert feature["properties"]["measurements"]["probability tumor"] == pytest.approx(p)
    assert not (out / "annotations" / f"{NORMAL_SLIDE}.geojson").exists()


def _check_asap_export(out, tiles) -> None:
    """The tumour slide's ASAP export reads back through histotoken's reader as its tumour-class tiles."""
    import shapely

    from histotoken.data.wsi.annotations import read_annotations

    path = out / "annotations" / f"{TUMOR_SLIDE}.xml"
    tumour = tiles[tiles["prob/tumor"] > tiles["prob/normal"]]
    assert len(tumour)  # the tiny model calls some tiles tumour
    expected = shapely.union_all(shapely.box(tumour["x"], tumour["y"], tumour["x"] + TILE_SPAN,
                                             tumour["y"] + TILE_SPAN))
    region = read_annotations(path).region
    assert region.symmetric_difference(expected).area == 0
    regions = [a for a in ElementTree.parse(path).getroot().iter("Annotation") if a.get("PartOfGroup") == "Tumor region"]
    high = tiles[tiles["prob/tumor"] >= 0.5]
    merged = shapely.union_all(shapely.box(high["x"], high["y"], high["x"] + TILE_SPAN, high["y"] + TILE_SPAN))
    assert sum(shapely.Polygon([(float(c.get("X")), float(c.get("Y"))) for c in a.iter("Coordinate")]).area
               for a in regions) == merged.area


def test_slide_scores_are_the_maximum_and_top_k_mean():
    assert slide_scores(np.array([0.1, 0.9, 0.5, 0.7]), top_k=2) == pytest.approx((0.9, 0.8))
    assert slide_scores(np.array([0.3]), top_k=5) == pytest.approx((0.3, 0.3))
    assert all(np.isnan(slide_scores(np.array([]), top_k=5)))


def test_tumour_class_is_found_by_name():
    assert tumor_class_index(["normal", "tumor"]) == 1
    assert tumor_class_index(["malignant", "benign"]) == 0


def _prediction_folder(out, annotated: bool):
    """A slide-prediction folder by hand: one slide's scores and the run record (no pictures)."""
    out.mkdir()
    (out / formats.SLIDE_SCORES).write_text(
        "slide,n_tiles,score_max,score_topk_mean,prediction,slide_label,patient_id\nslide_a,4,0.9,0.7,tumor,,p1\n")
    (out / formats.SLIDE_PREDICTION).write_text(json.dumps({
        "model_name": "deit_tiny", "run_id": "deit-run-7", "threshold": 0.5, "threshold_source": "default",
        "slide_score": "topk_mean", "top_k": 5,
    }))
    (out / "tiling").mkdir()
    (out / "tiling" / formats.TILE_SUMMARY).write_text(
        f"slide,status,annotations\nslide_a,done,{'ann/slide_a.xml' if annotated else ''}\n")
    return out


def test_slide_report_states_run_threshold_and_heads_annotations_only_when_given(tmp_path):
    from histotoken.reporting.slides import build_slide_report

    report = build_slide_report(_prediction_folder(tmp_path / "out_folder", annotated=False)).read_text()
    assert "<h1>Slide predictions of deit_tiny (run deit-run-7) on 1 slide: slide_a</h1>" in report
    assert "out_folder" not in report.split("</h1>")[0]
    assert "mean of the 5 highest tile tumour probabilities is at least 0.50" in report
    assert "not tuned on validation slides" in report
    assert "Heatmaps next to the annotations" not in report and "No annotations were given" in report
    annotated = build_slide_report(_prediction_folder(tmp_path / "annotated", annotated=True)).read_text()
    assert "Heatmaps next to the annotations" in annotated and "No annotations were given" not in annotated


def test_slide_figure_has_a_probability_colour_bar_and_an_outline_legend(tmp_path):
    import matplotlib.pyplot as plt
    from PIL import Image

    from histotoken.reporting.slides import slide_figure

    for name in ("thumbnail.png", "heatmap.png"):
        Image.new("RGB", (32, 24), (200, 150, 200)).save(tmp_path / name)
    figure = slide_figure(tmp_path / "thumbnail.png", tmp_path / "heatmap.png", ("tissue", "probability"))
    bars = [axis for axis in figure.axes if axis.get_ylabel() == "tumour probability"]
    assert len(bars) == 1 and bars[0].get_ylim() == (0.0, 1.0)
    from matplotlib.collections import QuadMesh

    solids = [item for item in bars[0].collections if isinstance(item, QuadMesh)]  # the bar's colour strip
    assert len(solids) == 1 and solids[0].cmap.name == "jet"  # the heatmap's own colour map
    legend = figure.legends[0]
    labels = [text.get_text() for text in legend.get_texts()]
    assert labels[:3] == ["tissue outline", "tile labelled tumour (annotations or slide label)", "tile labelled normal"]
    edge = [tuple(round(c * 255) for c in patch.get_edgecolor()[:3]) for patch in legend.get_patches()]
    assert edge[:3] == [(0, 170, 0), (220, 0, 0), (0, 90, 255)]  # the colours the thumbnails draw
    plt.close(figure)
