"""The synthetic slide cohort (``histotoken synth --slides``), MIL heatmaps and the slide study demo.

One tiny cohort (8 slides of 3200 x 3200 px) is drawn once for the module, inside the demo's output
folder, so that the end-to-end demo test resumes it instead of drawing it again.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pandas as pd
import pytest

openslide = pytest.importorskip("openslide")

from histotoken.data.wsi.annotations import read_asap_xml  # noqa: E402
from histotoken.data.wsi.cohort import CohortSettings, generate_cohort, plan_slide, slide_paths  # noqa: E402
from histotoken.data.wsi.labels import read_slide_labels  # noqa: E402
from histotoken.data.wsi.reader import Resolution  # noqa: E402
from histotoken.data.wsi.tiling import TilingSettings, slide_jobs, tile_slides  # noqa: E402

TINY = {"cohort.slides": 8, "cohort.slide_size": [3200, 3200], "tiling.mpp": 8.0, "embed.model": "test_resnet",
        "embed.batch_size": 256, "fit.epochs": 2, "evaluation.bootstrap": 50, "evaluation.test_fraction": 0.5,
        "workers": 2}
SETTINGS = CohortSettings(n_slides=8, size=(3200, 3200), seed=0)
MM2_PER_PIXEL = (SETTINGS.mpp / 1000) ** 2


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("slides_demo")
    generate_cohort(out / "cohort", SETTINGS, workers=2)
    return out


@pytest.fixture(scope="module")
def cohort(demo_dir):
    return demo_dir / "cohort"


@pytest.fixture(scope="module")
def manifest(cohort):
    return {record["slide"]: record for record in json.loads((cohort / "cohort.json").read_text())["slides"]}


def _slide_of_stage(manifest, stage):
    return next(name for name, record in manifest.items() if record["stage"] == stage)


@pytest.fixture(scope="module")
def macro_tiles(cohort, manifest, tmp_path_factory):
    """The macro slide tiled at 32 px, 4 um/px (128 um tiles), with its annotations."""
    slide = _slide_of_stage(manifest, "macro")
    out = tmp_path_factory.mktemp("tiles")
    jobs = slide_jobs([cohort / "slides" / f"{slide}.tif"], cohort / "annotations", cohort / "slides.csv")
    tile_slides(jobs, out, TilingSettings(tile_size=32, resolution=Resolution(4.0, "mpp")))
    return slide, out, pd.read_parquet(out / "tiles" / f"{slide}.parquet")


def test_cohort_slides_open_in_openslide_as_pyramids_with_their_pixel_size(cohort, manifest):
    paths = slide_paths(cohort)
    assert len(paths) == 8
    for path in paths:
        with openslide.OpenSlide(str(path)) as slide:
            assert slide.level_count > 1
            assert slide.dimensions == (3200, 3200)
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(1.0, rel=1e-3)
    marker = json.loads((cohort / "histotoken_synthetic.json").read_text())
    assert marker["synthetic"] is True and marker["complete"] is True


def test_slides_csv_gives_labels_and_patients_with_two_slides(cohort, manifest):
    labels = read_slide_labels(cohort / "slides.csv")
    assert sorted(labels.index) == sorted(manifest)
    for slide, row in labels.iterrows():
        assert row["label"] == manifest[slide]["label"]
        assert row["label"] == ("normal" if manifest[slide]["stage"] == "negative" else "tumor")
    slides_per_patient = labels.groupby("patient_id").size()
    assert slides_per_patient.max() == 2 and slides_per_patient.min() == 1
    assert set(labels["label"]) == {"tumor", "normal"}


def test_deposits_span_macro_micro_and_isolated_cell_sizes(manifest):
    diameters = {stage: [r["longest_diameter_um"] for record in manifest.values() for r in record["regions"]
                         if r["stage"] == stage] for stage in ("macro", "micro", "itc")}
    assert diameters["macro"] and min(diameters["macro"]) > 2000
    assert diameters["micro"] and all(200 <= d <= 2000 for d in diameters["micro"])
    assert diameters["itc"] and max(diameters["itc"]) < 200
    assert all(record["annotations"] is None for record in manifest.values() if record["stage"] == "negative")


def test_annotations_and_manifest_match_the_purple_pixels_drawn(cohort, manifest):
    """Independent of the manifest's arithmetic: tumour area counted on the slide's pixels (level 1, 2 um/px)
    against shapely's area of the ASAP polygons. The texture shifts all three channels of a pixel alike, so the
    channel differences name the colour drawn: tumour (150, 88, 176) alone has B - G = 88 and R - G = 62."""
    from histotoken.data.wsi.cohort import TUMOUR_COLOUR

    red, green, blue = TUMOUR_COLOUR
    for slide, record in manifest.items():
        if record["stage"] == "negative":
            assert not (cohort / "annotations" / f"{slide}.xml").exists()
            continue
        polygons_mm2 = read_asap_xml(cohort / record["annotations"]).region.area * MM2_PER_PIXEL
        assert polygons_mm2 == pytest.approx(record["tumour_area_mm2"], rel=1e-3)
        with openslide.OpenSlide(str(cohort / record["file"])) as handle:
            pixels = np.asarray(handle.read_region((0, 0), 1, handle.level_dimensions[1]).convert("RGB")).astype(int)
        tumour = ((np.abs(pixels[..., 2] - pixels[..., 1] - (blue - green)) <= 1)
                  & (np.abs(pixels[..., 0] - pixels[..., 1] - (red - green)) <= 1))
        drawn_mm2 = float(tumour.sum()) * (2 * SETTINGS.mpp / 1000) ** 2
        assert drawn_mm2 == pytest.approx(polygons_mm2, rel=0.08, abs=0.002), slide


def test_tiled_tumour_fraction_matches_the_manifest(macro_tiles, manifest, cohort):
    slide, _, table = macro_tiles
    record = manifest[slide]
    tile_side = 128  # level-0 pixels: 32 px at 4 um/px on a 1 um/px slide
    tumour_mm2 = float(table["tumor_fraction"].sum()) * tile_side**2 * MM2_PER_PIXEL
    polygons_mm2 = read_asap_xml(cohort / record["annotations"]).region.area * MM2_PER_PIXEL
    assert tumour_mm2 == pytest.approx(polygons_mm2, rel=0.03)  # every deposit tile is kept (deposits lie in tissue)
    tissue_mm2 = len(table) * tile_side**2 * MM2_PER_PIXEL
    assert tissue_mm2 == pytest.approx(record["tissue_area_mm2"], rel=0.1)
    assert tumour_mm2 / tissue_mm2 == pytest.approx(record["tumour_area_fraction"], rel=0.1)
    assert (table["label"] == "tumor").sum() > 0


def test_cohort_is_deterministic_resumes_and_refuses_other_parameters(cohort, manifest):
    first = plan_slide(3, "s", "p", "micro", SETTINGS)
    again = plan_slide(3, "s", "p", "micro", SETTINGS)
    other = plan_slide(3, "s", "p", "micro", CohortSettings(n_slides=8, size=(3200, 3200), seed=1))
    assert first.regions == again.regions and first.tissue == again.tissue
    assert first.regions != other.regions
    assert generate_cohort(cohort, SETTINGS).created == 0
    with pytest.raises(ValueError, match="seed"):
        generate_cohort(cohort, CohortSettings(n_slides=8, size=(3200, 3200), seed=5))


def test_heatmap_is_the_thumbnail_with_hot_pixels_on_the_planted_region(macro_tiles, manifest, cohort):
    from PIL import Image

    from histotoken.data.wsi.reader import open_slide
    from histotoken.data.wsi.tissue import read_at_mpp
    from histotoken.mil.heatmaps import THUMBNAIL_MPP, heatmap_png

    slide, _, table = macro_tiles
    record = manifest[slide]
    with open_slide(cohort / record["file"]) as handle:
        thumbnail, _, scale = read_at_mpp(handle, THUMBNAIL_MPP)
    planted = pd.DataFrame({"x": table["x"], "y": table["y"], "importance": (table["tumor_fraction"] >= 0.5) * 1.0})
    png = heatmap_png(cohort / record["file"], planted, 128, cohort / record["annotations"])
    picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    height, width = thumbnail.shape[:2]
    assert picture.shape[1] > width + 40  # the colour bar on the right
    overlay = picture[:height, :width]
    untouched = (overlay == thumbnail).all(-1)  # outside the tiles the thumbnail shows through unchanged
    assert untouched.mean() > 0.2
    red, green, blue = overlay[..., 0], overlay[..., 1], overlay[..., 2]
    hot = (red - green > 80) & (red - blue > 60)
    rows, columns = np.nonzero(hot)
    assert len(rows) > 50
    import shapely

    outlined = read_asap_xml(cohort / record["annotations"]).region
    centres = shapely.points((columns + 0.5) * scale[0], (rows + 0.5) * scale[1])
    assert shapely.contains(outlined.buffer(128), centres).mean() > 0.97  # a tile of slack at the deposit's edge
    grid_rows, grid_columns = np.mgrid[0:height, 0:width]
    every = shapely.points((grid_columns.ravel() + 0.5) * scale[0], (grid_rows.ravel() + 0.5) * scale[1])
    interior = shapely.contains(outlined.buffer(-128), every).reshape(height, width)
    assert interior.sum() > 100 and hot[interior].mean() > 0.8  # the deposit is hot inside, not only at its rim


def test_slides_demo_end_to_end_writes_the_report_and_resumes(demo_dir, manifest, caplog):
    from histotoken.experiments.slides_demo import load_config, run_slides_demo
    from histotoken.mil.train import evaluate_run

    config = load_config(overrides=TINY)
    assert {"mean", "max", "abmil", "tokenlearner"} <= set(config["aggregators"])
    assert any(a.startswith("topk") for a in config["aggregators"])
    assert any(a.startswith("token_merging") for a in config["aggregators"])
    report = run_slides_demo(demo_dir, config)
    steps = json.loads((demo_dir / "steps.json").read_text())
    assert steps["cohort"]["reused"] is True  # drawn by the fixture with the same parameters
    page = report.read_text()
    for heading in ("AUROC [95% interval]", "balanced accuracy [95% interval]", "tokens kept", "ms per slide"):
        assert heading in page
    assert "SYNTHETIC DATA" in page and "random, untrained weights" in page
    assert (demo_dir / "figures" / "accuracy_vs_tokens.png").is_file()
    heatmaps = sorted((demo_dir / "figures").glob("heatmap_*.png"))
    assert heatmaps
    abmil = demo_dir / "runs" / "abmil"
    evaluation = json.loads((abmil / "eval.json").read_text())
    assert f"{evaluation['auroc']:.2f}" in page
    test_slides = pd.read_csv(abmil / "predictions.csv")["slide"]
    assert {p.stem for p in (abmil / "heatmaps").glob("*.png")} == set(test_slides)
    topk = json.loads((demo_dir / "runs" / "topk-k-4" / "eval.json").read_text())
    assert topk["cost"]["tokens_kept_mean"] == 4

    again = run_slides_demo(demo_dir, config)  # every step is reused
    steps = json.loads((demo_dir / "steps.json").read_text())
    assert again == report and all(info.get("reused") for name, info in steps.items() if name != "report")

    # a slide that is gone: its heatmap is skipped with one warning, the evaluation still runs
    moved = demo_dir / "cohort" / "slides" / f"{test_slides.iloc[0]}.tif"
    moved.rename(moved.with_suffix(".moved"))
    try:
        for path in (abmil / "heatmaps").glob("*.png"):
            path.unlink()
        with caplog.at_level(logging.WARNING, logger="histotoken.mil.heatmaps"):
            evaluate_run(abmil)
        assert "heatmap(s) left out" in caplog.text
        assert not (abmil / "heatmaps" / f"{test_slides.iloc[0]}.png").exists()
        assert len(list((abmil / "heatmaps").glob("*.png"))) == len(test_slides) - 1
    finally:
        moved.with_suffix(".moved").rename(moved)


def test_synth_slides_command_writes_a_cohort_and_rejects_a_small_slide(tmp_path, capsys):
    from histotoken.cli.main import main

    out = tmp_path / "cohort"
    assert main(["synth", "--slides", "2", "--slide-size", "3200x3200", "--workers", "1", str(out)]) == 0
    assert "synthetic slide cohort written: 2 slides" in capsys.readouterr().out
    labels = read_slide_labels(out / "slides.csv")
    assert sorted(labels["label"]) == ["normal", "tumor"]
    assert len(list((out / "slides").glob("*.tif"))) == 2 and len(list((out / "annotations").glob("*.xml"))) == 1
    with pytest.raises(SystemExit):
        main(["synth", "--slides", "2", "--slide-size", "2000x2000", str(tmp_path / "small")])
    assert "from 3200 to 40000 pixels" in capsys.readouterr().err


def test_demo_overrides_name_the_unknown_setting():
    from histotoken.experiments.slides_demo import load_config

    assert load_config(overrides=["cohort.slides=5"])["cohort"]["slides"] == 5
    with pytest.raises(ValueError, match="cohort.slide_count is not a setting"):
        load_config(overrides=["cohort.slide_count=5"])
    with pytest.raises(ValueError, match="unknown aggregator 'attention'"):
        load_config(overrides={"aggregators": ["mean", "attention"]})
