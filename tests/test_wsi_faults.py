"""Hostile and broken slide-side inputs: huge declared sizes, garbage tile data, killed parents, bad annotations.

Every hostile file is made here: a hand-written TIFF declaring 262,144 x 262,144 pixels in 33 KB, a generated
pyramid whose tile data at the tiling level is overwritten with garbage, malformed GeoJSON and ASAP XML.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histotoken import formats
from histotoken.cli.main import main
from histotoken.data.wsi.annotations import read_annotations
from histotoken.data.wsi.reader import open_slide
from histotoken.data.wsi.tiling import slide_jobs, tile_slides
from tests.slide_fixture import NORMAL_SLIDE, TILE_SIZE, TUMOR_SLIDE, shared_slide_set


@pytest.fixture(scope="session")
def slide_set(tmp_path_factory):
    return shared_slide_set(tmp_path_factory)


def write_huge_tiff(path: Path, width: int, height: int, tile: int = 4096) -> Path:
    """A classic little-endian tiled RGB TIFF declaring ``width`` x ``height`` at 0.25 mpp whose every tile
    points at one short deflate stream: a few tens of kilobytes that would decode to gigabytes."""
    data = zlib.compress(b"\xff" * 16)
    count = -(-width // tile) * -(-height // tile)
    bits_at = 8 + len(data)
    offsets_at = bits_at + 6
    counts_at = offsets_at + 4 * count
    resolution_at = counts_at + 4 * count
    ifd_at = resolution_at + 8
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, bits_at), (259, 3, 1, 8), (262, 3, 1, 2),
            (277, 3, 1, 3), (282, 5, 1, resolution_at), (283, 5, 1, resolution_at), (284, 3, 1, 1), (296, 3, 1, 3),
            (322, 3, 1, tile), (323, 3, 1, tile), (324, 4, count, offsets_at), (325, 4, count, counts_at)]
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_at))
    out += data + struct.pack("<3H", 8, 8, 8)
    out += struct.pack(f"<{count}I", *([8] * count)) + struct.pack(f"<{count}I", *([len(data)] * count))
    out += struct.pack("<2I", 40000, 1) + struct.pack("<H", len(tags))  # 40000 px/cm: 0.25 mpp
    for tag, kind, number, value in tags:
        packed = struct.pack("<HH", value, 0) if kind == 3 and number == 1 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, number) + packed
    path.write_bytes(bytes(out + struct.pack("<I", 0)))
    return path


def test_slide_declaring_an_implausible_size_is_refused_in_one_line(tmp_path):
    path = write_huge_tiff(tmp_path / "bomb.tif", 262144, 262144)
    assert path.stat().st_size < 40_000
    with pytest.raises(ValueError, match=r"bomb\.tif: declares 262144 x 262144 pixels") as error:
        open_slide(path)
    assert "\n" not in str(error.value)


def test_tile_reports_the_huge_slide_failed_and_tiles_the_good_one(slide_set, tmp_path, capsys):
    bomb = write_huge_tiff(tmp_path / "bomb.tif", 4_194_304, 1024, tile=1024)
    out = tmp_path / "tiles"
    assert main(["tile", str(slide_set["normal"]), str(bomb), "--out", str(out), "--tile-size", str(TILE_SIZE)]) == 1
    printed = capsys.readouterr().out
    assert "1 of 2 slides tiled: 28 tiles" in printed and "bomb.tif: declares 4194304 x 1024 pixels" in printed


def _garbage_level(source: Path, target: Path, page: int) -> Path:
    """A copy of ``source`` whose tile data on TIFF ``page`` is overwritten with random bytes."""
    import tifffile

    raw = bytearray(source.read_bytes())
    with tifffile.TiffFile(source) as tiff:
        tiff_page = tiff.pages[page]
        spans = list(zip(tiff_page.dataoffsets, tiff_page.databytecounts))
    rng = np.random.default_rng(0)
    for offset, count in spans:
        raw[offset: offset + count] = rng.integers(0, 256, size=count, dtype=np.uint8).tobytes()
    target.write_bytes(bytes(raw))
    return target


def test_garbage_tile_data_at_the_tiling_level_fails_that_slide_only(slide_set, tmp_path, capsys):
    # The mask reads level 3; tiles at 0.5 mpp read level 1, whose data is garbage: the old code said "done".
    broken = _garbage_level(slide_set["normal"], tmp_path / "garbled.tif", page=1)
    out = tmp_path / "tiles"
    argv = ["tile", str(slide_set["tumour"]), str(broken), "--out", str(out), "--tile-size", str(TILE_SIZE)]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert "1 of 2 slides tiled" in printed
    failed = [line for line in printed.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "garbled.tif: tile data at level 1 cannot be read (OpenSlideError" in failed[0]
    summary = pd.read_csv(formats.TilePaths(out).summary)
    assert dict(zip(summary["slide"], summary["status"])) == {TUMOR_SLIDE: "done", "garbled": "failed"}
    assert not formats.TilePaths(out).table("garbled").exists()


def _state(pid: int) -> str:
    """The process state letter from /proc (``""`` when the process is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process states from /proc")
def test_tile_workers_exit_when_the_parent_is_killed(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        import histotoken.data.wsi.tiling as tiling

        def slow(job, settings, out_dir):  # stands in for a long slide
            print(os.getpid(), flush=True)
            time.sleep(120)

        tiling.tile_one_slide = slow
        jobs = [tiling.SlideJob(Path("a.tif")), tiling.SlideJob(Path("b.tif"))]
        tiling.tile_slides(jobs, Path({str(tmp_path / "tiles")!r}), workers=2)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        workers = [int(parent.stdout.readline()) for _ in range(2)]
        assert all(_state(pid) not in ("", "Z") for pid in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30  # a generous bound for a loaded machine; the signal is immediate
        while time.monotonic() < deadline and any(_state(pid) not in ("", "Z") for pid in workers):
            time.sleep(0.1)
        alive = [pid for pid in workers if _state(pid) not in ("", "Z")]
        assert not alive, f"workers {alive} outlived their parent"
    finally:
        for pid in workers if "workers" in locals() else []:
            if _state(pid) not in ("", "Z"):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"type": "FeatureCollection", "features": [[[0, 0], [1, 1]]]}, r"feature 1 is a list, not a GeoJSON Feature"),
        ({"type": "FeatureCollection", "features": {"a": 1}}, r"'features' must be a list"),
        ({"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {"name": "Tumor"},
          "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 9]]]}}]},
         r"feature 1: a polygon ring is not closed"),
        ({"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},
          "geometry": {"type": "Polygon", "coordinates": "none"}}]}, r"feature 1: its coordinates are not a valid"),
    ],
)
def test_bad_geojson_is_named_in_plain_words(tmp_path, content, message):
    path = tmp_path / "slide_a.geojson"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"slide_a\.geojson: " + message) as error:
        read_annotations(path)
    assert "object has no attribute" not in str(error.value) and "LinearRing" not in str(error.value)


def test_bad_asap_coordinate_is_named(tmp_path):
    path = tmp_path / "slide_b.xml"
    path.write_text('<ASAP_Annotations><Annotations><Annotation Name="A1" PartOfGroup="_0"><Coordinates>'
                    '<Coordinate Order="0" X="twelve" Y="1"/></Coordinates></Annotation></Annotations>'
                    "</ASAP_Annotations>")
    with pytest.raises(ValueError, match=r"slide_b\.xml: annotation 1 \('A1'\) has a Coordinate without numeric"):
        read_annotations(path)


def test_bad_annotation_fails_its_slide_naming_both_files(slide_set, tmp_path):
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    (annotations / f"{TUMOR_SLIDE}.geojson").write_text(json.dumps({"features": [["not", "a", "feature"]]}))
    summary = tile_slides(slide_jobs([slide_set["tumour"]], annotations), tmp_path / "tiles")
    error = summary.loc[0, "error"]
    assert summary.loc[0, "status"] == "failed"
    assert f"{TUMOR_SLIDE}.tif" in error and f"{TUMOR_SLIDE}.geojson: feature 1 is a list" in error


def test_tumour_slide_whose_annotations_hold_no_polygon_warns(slide_set, tmp_path, caplog):
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    (annotations / f"{TUMOR_SLIDE}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    jobs = slide_jobs([slide_set["tumour"]], annotations, slide_set["labels"])
    with caplog.at_level(logging.WARNING, logger="histotoken.data.wsi.tiling"):
        tile_slides(jobs, tmp_path / "tiles", _settings())
    assert any("labelled tumour but its annotation file" in r.getMessage() and f"{TUMOR_SLIDE}.geojson" in r.getMessage()
               for r in caplog.records)


def _settings():
    from histotoken.data.wsi.tiling import TilingSettings

    return TilingSettings(tile_size=TILE_SIZE)


def test_slides_keeping_almost_nothing_are_flagged(tmp_path, caplog):
    from histotoken.data.wsi.synthetic import Shape, write_slide

    blank = write_slide(tmp_path / "blank.tif", [Shape("rect", (0, 0, 8, 8), (230, 150, 200))], (1024, 1024), levels=3)
    with caplog.at_level(logging.WARNING, logger="histotoken.data.wsi.tiling"):
        summary = tile_slides(slide_jobs([blank]), tmp_path / "tiles", _settings())
    assert summary.loc[0, "status"] == "done" and summary.loc[0, "n_tiles"] == 0
    assert summary.loc[0, "tissue_fraction"] == 0.0
    assert any("blank: only 0 tiles kept" in r.getMessage() for r in caplog.records)


def test_summary_records_each_slides_tissue_fraction(slide_set, tmp_path):
    summary = tile_slides(slide_jobs([slide_set["normal"]]), tmp_path / "tiles", _settings())
    on_disk = pd.read_csv(formats.TilePaths(tmp_path / "tiles").summary)
    # Tissue A (512 x 512) and B (448 x 384) of the 2048 x 1536 slide: 434,176 of 3,145,728 pixels.
    assert on_disk.loc[0, "tissue_fraction"] == pytest.approx((512 * 512 + 448 * 384) / (2048 * 1536), abs=1e-4)
    assert on_disk.loc[0, "slide"] == NORMAL_SLIDE and summary.loc[0, "tissue_fraction"] == on_disk.loc[0, "tissue_fraction"]


def test_reading_a_garbage_tile_names_the_slide(slide_set, tmp_path):
    from histotoken.data.wsi.dataset import read_tile

    broken = _garbage_level(slide_set["normal"], tmp_path / "garbled.tif", page=1)
    with pytest.raises(ValueError, match=r"garbled\.tif: the tile at \(256, 256\) on level 1 cannot be read "
                                         r"\(OpenSlideError") as error:
        read_tile(broken, 256, 256, 1, 64, 64)
    assert "\n" not in str(error.value)
