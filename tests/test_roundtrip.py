"""Every file the tool writes and another part reads back: written by the real writer, read by the real reader.

Each test checks that the values survive with their types: ints stay ints, None stays None, strings that
look like numbers ("007", "100") stay strings, tuples and nested mappings come back, and paths with spaces
and non-ASCII letters are unchanged. Nothing is trained: the objects and tables are built directly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histotoken import formats
from histotoken.formats import RunPaths, StudyPaths, TilePaths

ODD_FOLDER = "data folder é ü"  # a space and non-ASCII letters in every path below


# --------------------------------------------------------------------------- spec.yaml, dataset.json, splits


@pytest.fixture(scope="module")
def prepared_study(tmp_path_factory):
    """A study prepared by the grid (spec.yaml, dataset.json, splits/seed*.csv) on a tiny BreakHis folder."""
    from histotoken.experiments.grid import prepare_study
    from histotoken.experiments.spec import spec_from_dict
    from tests.study_fixture import write_images

    root = tmp_path_factory.mktemp("prepared") / ODD_FOLDER
    data = root / "data"
    write_images(data, np.random.default_rng(0), synthetic=True)
    raw = {
        "name": "round trip", "data": str(data), "tasks": ["binary", "subtype"],
        "models": ["resnet18", {"name": "cnnprune_vit_tiny", "kwargs": {"keep_ratio": 0.5, "patch_size": 8}}],
        "train_domains": ["100", "100+400"], "test_domains": ["100", "400"], "seeds": [0, 1],
        "split": {"scheme": "patient", "val": 0.34, "test": 0.34},
        "protocol": {"img_size": 32, "epochs": 1, "stage_epochs": [1, 2], "layer_decay": None},
        "factors": {"balancing": ["none", "sampler"]},
        "reference_model": "cnnprune_vit_tiny:keep_ratio=0.5,patch_size=8",
        "explain": {"domains": ["100"], "n": 4, "steps": 4, "random_orders": 1, "tsne": False},
    }
    spec = spec_from_dict(raw, "spec.yaml")
    split_paths = prepare_study(spec, root / "study")
    return spec, root / "study", split_paths


def test_the_spec_the_grid_writes_reads_back_equal(prepared_study):
    from histotoken.experiments.spec import load_spec

    spec, study, _ = prepared_study
    again = load_spec(StudyPaths(study).spec)
    assert again == spec
    assert again.explain["n"] == 4 and again.explain["tsne"] is False and again.explain["domains"] == ["100"]
    assert again.protocol["stage_epochs"] == [1, 2] and again.protocol["layer_decay"] is None
    assert again.factors == {"balancing": ("none", "sampler")}
    assert ODD_FOLDER in again.data


def test_report_re_reads_the_spec_and_rebuilds_the_tables(prepared_study):
    from histotoken.experiments.grid import collect_tables

    spec, study, _ = prepared_study
    runs = collect_tables(study)  # what `histotoken report STUDY` does first
    assert len(runs) == 2 * 2 * 2 * 2 * 2  # seeds x tasks x models x train domains x factor levels
    assert set(runs["status"]) == {"pending"}


def test_split_files_the_grid_writes_read_back_with_their_types(prepared_study):
    from histotoken.data.splits import SPLIT_COLUMNS, read_split

    _, study, split_paths = prepared_study
    assert set(split_paths) == {"seed0", "seed1"}
    split = read_split(split_paths["seed0"])
    assert list(split.columns) == SPLIT_COLUMNS
    assert split["patient_id"].map(type).eq(str).all() and split["patient_id"].str.startswith("14-").all()
    assert set(split["magnification"]) == {40, 100, 200, 400} and split["magnification"].dtype.kind == "i"
    assert split["path"].str.contains(ODD_FOLDER).all()
    assert all(Path(path).is_file() for path in split["path"])
    assert set(split["split"]) == {"train", "val", "test"}


def test_dataset_json_reads_back_in_the_report(prepared_study):
    from histotoken.reporting.study import load_study

    _, study, _ = prepared_study
    StudyPaths(study).results_table.write_text(",".join(formats.RESULT_COLUMNS) + "\n", encoding="utf-8")
    files = load_study(study)
    assert files.dataset["n_patients"] == 24 and isinstance(files.dataset["n_images"], int)
    assert files.synthetic is True
    assert {row["magnification"] for row in files.dataset["counts"]} == {40, 100, 200, 400}
    assert files.spec["explain"]["n"] == 4  # the report's own YAML reader sees the same block
    assert set(files.split_files) == {"seed0.csv", "seed1.csv"}


@pytest.mark.parametrize("patient_id", ["007", "NA", "None", "1e3", "patient é 1"])
def test_a_split_csv_keeps_patient_ids_that_look_like_numbers_or_missing_values(tmp_path, patient_id):
    from histotoken.data.splits import read_split, write_split

    folder = tmp_path / ODD_FOLDER
    frame = pd.DataFrame({
        "path": [str(folder / "0001.png"), str(folder / "a b.png")],
        "patient_id": [patient_id, "2"],
        "tumor_class": ["0", "fibroadenoma"],
        "label": ["benign", "1"],
        "magnification": [0, 400],
        "split": ["train", "test"],
    })
    written = write_split(frame, folder / "splits.csv")
    again = read_split(written)
    pd.testing.assert_frame_equal(again, frame)


def test_an_image_level_split_keeps_its_scheme_record_when_read_back(tmp_path):
    from histotoken.data.splits import SCHEME_COLUMN, make_split, read_split, write_split

    index = pd.DataFrame({
        "path": [str(tmp_path / ODD_FOLDER / f"{k}.png") for k in range(12)],
        "patient_id": ["007", "NA"] * 6, "tumor_class": ["a", "b"] * 6, "label": ["a", "b"] * 6,
        "magnification": [100] * 12,
    })
    split = make_split(index, "image", 0.25, 0.25, None, 0, 0)
    again = read_split(write_split(split, tmp_path / ODD_FOLDER / "splits.csv"))  # a patient on two sides: allowed
    pd.testing.assert_frame_equal(again, split)
    assert set(again[SCHEME_COLUMN]) == {"image"}


# --------------------------------------------------------------------------- config.yaml


def test_run_config_reads_back_equal(tmp_path):
    from histotoken.config import RunConfig, load_run_config, write_run_config
    from histotoken.engine.evaluate import run_settings
    from histotoken.engine.fit import check_same_config

    config = RunConfig(
        data=str(tmp_path / ODD_FOLDER), data_format="imagefolder", groups=str(tmp_path / ODD_FOLDER / "groups.csv"),
        model="cnnprune_vit_tiny:keep_ratio=0.5", task="subtype", train_domain="100+400",
        splits=None, folds=5, fold=3, img_size=32, stage_epochs=(3, 12), lr=1e-5, layer_decay=None,
        devices="2", pretrained=True, weights=None, seed=7,
    )
    paths = RunPaths(tmp_path / "run é")
    paths.root.mkdir()
    write_run_config(config, paths.config)
    again = load_run_config(paths.config)
    assert again == config
    assert again.stage_epochs == (3, 12) and again.devices == "2" and again.splits is None
    check_same_config(paths, config)  # the engine's own re-read finds the same configuration
    settings = run_settings(paths.root)  # the raw mapping evaluate and predict read
    assert settings["seed"] == 7 and settings["lr"] == 1e-5 and settings["weights"] is None


# --------------------------------------------------------------------------- evaluation JSON -> results.csv


def test_an_evaluation_reads_back_into_the_study_results(tmp_path):
    """eval/<domain>.json (as evaluate writes it) -> results.csv (grid) -> the report's results table."""
    from histotoken.engine.evaluate import compute_metrics
    from histotoken.experiments.grid import collect_results
    from histotoken.io import atomic_write_json
    from histotoken.reporting.tables import read_results, read_runs

    study = StudyPaths(tmp_path / ODD_FOLDER)
    run_dir = study.run_dir("resnet18__subtype__train100+400__seed0")
    classes = ["bénin", "malin"]
    y_true = np.array([0, 0, 1, 1, 0, 1])
    y_pred = np.array([0, 1, 1, 1, 0, 0])
    patients = pd.Series(["007", "007", "008", "009", "010", "011"])
    metrics = compute_metrics(y_true, y_pred, patients, classes, 0, seed=0)  # no bootstrap: null intervals
    for domain in ("100", "100+400"):
        atomic_write_json(RunPaths(run_dir).eval_file(domain), {"domain": domain, "task": "subtype", **metrics})
    pd.DataFrame([{
        "run_id": run_dir.name, "model": "resnet18", "model_name": "resnet18", "model_kwargs": "{}",
        "task": "subtype", "train_domain": "100+400", "seed": 0, "status": "finished", "error": "",
        "run_dir": f"runs/{run_dir.name}",
    }]).to_csv(study.runs_table, index=False)

    results = read_results(collect_results(study.root))
    assert read_runs(study.runs_table)["train_domain"].tolist() == ["100+400"]
    assert sorted(results["test_domain"]) == sorted(["100", "100+400"] * len(formats.RESULT_METRICS))
    assert results["test_domain"].map(type).eq(str).all() and results["train_domain"].eq("100+400").all()
    macro = results[(results["metric"] == "macro_f1") & (results["test_domain"] == "100")].iloc[0]
    assert macro["value"] == pytest.approx(metrics["macro_f1"])
    assert math.isnan(macro["ci_low"]) and math.isnan(macro["ci_high"])  # null intervals stay missing


def test_predictions_csv_reads_back_in_the_report(tmp_path):
    """eval/<domain>.predictions.csv as evaluate writes it, read by the report's statistics."""
    from histotoken.io import atomic_write_text
    from histotoken.reporting.statistics import num_classes_of, read_predictions

    paths = RunPaths(tmp_path / ODD_FOLDER)
    names = ["bénin", "malin tumour"]
    predictions = pd.DataFrame({
        "path": [str(tmp_path / ODD_FOLDER / "a b.png"), "0002", "c.png"],
        "patient_id": ["007", "1e3", "NA"], "target": [0, 1, 1], "prediction": [1, 1, 0],
        f"{formats.PROBABILITY_PREFIX}{names[0]}": [0.25, 0.5, 0.9],
        f"{formats.PROBABILITY_PREFIX}{names[1]}": [0.75, 0.5, 0.1],
    })
    atomic_write_text(paths.predictions_file("100+400"), predictions.to_csv(index=False))

    read = read_predictions(paths.root, "100+400")
    assert read.patients.tolist() == ["007", "1e3", "NA"]
    assert read.paths.tolist() == predictions["path"].tolist()
    assert read.y_true.tolist() == [0, 1, 1] and read.y_pred.tolist() == [1, 1, 0]
    assert num_classes_of(paths.predictions_file("100+400")) == 2


# --------------------------------------------------------------------------- export.json and the timm folder


def test_export_manifest_and_timm_folder_read_back(tmp_path):
    import torch

    from histotoken.engine.export import ExportInfo, export_model, load_timm_export
    from histotoken.io import read_json
    from histotoken.models.factory import ModelSpec, create_model

    kwargs = {"patch_size": 8, "depth": 2}
    classes = ("bénin", "malin tumour", "007")
    torch.manual_seed(0)
    model = create_model(ModelSpec("deit_tiny_patch16_224", tuple(sorted(kwargs.items()))), len(classes), 32).eval()
    source = {"run_dir": str(tmp_path / ODD_FOLDER), "best_epoch": 0, "merge_r": 0, "stain_normalisation": None,
              "task": "subtype", "train_domain": "100+400"}
    info = ExportInfo("deit_tiny_patch16_224", classes, 32, (0.5, 0.25, 0.125), (0.2, 0.3, 0.4), kwargs, source)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    result = export_model(model, "timm", tmp_path / ODD_FOLDER / "timm", info, images)

    manifest = read_json(result.manifest)
    assert manifest["class_names"] == list(classes) and manifest["num_classes"] == 3
    assert manifest["img_size"] == 32 and isinstance(manifest["img_size"], int)
    assert manifest["mean"] == [0.5, 0.25, 0.125] and manifest["std"] == [0.2, 0.3, 0.4]
    assert manifest["model_kwargs"] == kwargs and manifest["source"] == source
    assert manifest["token_merging"] is None and manifest["format"] == "timm"

    loaded = load_timm_export(result.out_dir)
    assert loaded.num_classes == 3
    hub = json.loads((result.out_dir / formats.TIMM_CONFIG_FILE).read_text(encoding="utf-8"))
    assert hub["label_names"] == list(classes)
    assert list(hub["pretrained_cfg"]["mean"]) == [0.5, 0.25, 0.125]
    assert list(hub["pretrained_cfg"]["input_size"]) == [3, 32, 32]
    with torch.no_grad():
        expected = model(images.float() / 255)
        assert torch.allclose(loaded(images.float() / 255), expected, atol=1e-5)


# --------------------------------------------------------------------------- tile folders


def _tile_frame(slide: str, slide_path: str, patient_id: str, labels: list[str]) -> pd.DataFrame:
    count = len(labels)
    return pd.DataFrame({
        "slide": [slide] * count, "slide_path": [slide_path] * count,
        "x": np.arange(count, dtype=np.int64) * 448, "y": np.zeros(count, dtype=np.int64),
        "level": np.zeros(count, dtype=np.int64), "read_size": np.full(count, 448, dtype=np.int64),
        "tile_size": np.full(count, 224, dtype=np.int64), "mpp": np.full(count, 0.5),
        "tissue_fraction": np.linspace(0.5, 1.0, count),
        "tumor_fraction": np.array([np.nan if label == "" else float(label == "tumor") for label in labels]),
        "label": labels, "slide_label": ["tumor"] * count, "patient_id": [patient_id] * count,
    })[list(formats.TILE_COLUMNS)]


def test_tile_tables_settings_and_summary_read_back(tmp_path):
    from histotoken.data.index import load_index
    from histotoken.data.wsi.reader import Resolution
    from histotoken.data.wsi.tiling import (
        TilingSettings,
        check_settings,
        parquet_bytes,
        read_tile_tables,
        rebuild_summary,
    )
    from histotoken.io import atomic_write_bytes, atomic_write_json, read_json

    root = tmp_path / ODD_FOLDER
    paths = TilePaths(root)
    settings = TilingSettings(tile_size=224, resolution=Resolution(20, "power"), overlap=16, tissue_threshold=0.25)
    check_settings(root, settings)  # writes tiling.json
    assert TilingSettings.from_dict(read_json(paths.settings)) == settings
    check_settings(root, settings)  # and the re-read accepts it as the same settings

    tables = {
        "slide 007": _tile_frame("slide 007", str(tmp_path / "slides é" / "slide 007.svs"), "007",
                                 ["tumor", "normal", ""]),
        "slide_b": _tile_frame("slide_b", str(tmp_path / "slides é" / "slide_b.tif"), "NA", ["normal", "normal"]),
    }
    for name, frame in tables.items():
        record = {column: None for column in formats.TILE_SUMMARY_COLUMNS}
        record.update(slide=name, slide_path=frame["slide_path"].iloc[0], status="done", error="",
                      n_tiles=len(frame), n_tumor_tiles=int((frame["label"] == "tumor").sum()),
                      patient_id=frame["patient_id"].iloc[0], level=0, width=2048, height=1536, annotations="")
        atomic_write_json(paths.record(name), record)
        atomic_write_bytes(paths.table(name), parquet_bytes(frame))
    summary = rebuild_summary(root)

    # the tiling module's own reader
    read = read_tile_tables(root)
    pd.testing.assert_frame_equal(read, pd.concat(list(tables.values()), ignore_index=True))
    assert summary["slide"].tolist() == sorted(tables) and summary["n_tiles"].tolist() == [3, 2]

    # the data source recognises the folder by its summary.csv and reads the labelled tiles, patients as text
    index = load_index(root)
    frame = index.frame
    assert len(frame) == 4  # the unlabelled tile is left out (and listed as skipped)
    assert sorted(set(frame["patient_id"])) == ["007", "NA"]
    assert set(frame["tumor_class"]) == {"normal", "tumor"}
    assert all(ODD_FOLDER in key for key in frame["path"])
