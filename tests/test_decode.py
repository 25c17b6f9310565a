"""The one guarded decoder (data.decode): every listed format, bit depths, pages, bombs and truncated data.

Expected pixels come from the arrays written (by PIL, tifffile or a hand-built PNG), never from the decoder.
"""

from __future__ import annotations

import logging
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from histotoken.data.decode import IMAGE_SUFFIXES, MAX_PIXELS_ENV, decode_array, decode_image

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)  # (H, W, 3)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def hand_png(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes) -> bytes:
    """A PNG written from the specification (RFC 2083), independent of any image library."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(raw_rows))
        + png_chunk(b"IEND", b"")
    )


def cut_idat(data: bytes, keep: int) -> bytes:
    """The PNG with its IDAT data cut to ``keep`` bytes and the chunk's length and CRC fixed (all chunks present)."""
    out, position = bytearray(data[:8]), 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position:position + 4])
        kind = data[position + 4:position + 8]
        body = data[position + 8:position + 8 + length]
        out += png_chunk(kind, body[:keep] if kind == b"IDAT" else body)
        position += 12 + length
    return bytes(out)


def run_isolated(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter, so that a crash (SIGSEGV) fails the test instead of killing pytest."""
    import os

    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )


@pytest.mark.parametrize("suffix, options", [
    (".png", {}), (".bmp", {}), (".tif", {}), (".tiff", {"compression": "tiff_lzw"}),
    (".webp", {"lossless": True}),
])
def test_lossless_formats_written_by_pil_decode_pixel_for_pixel(tmp_path, suffix, options):
    path = tmp_path / f"image{suffix}"
    Image.fromarray(RGB).save(path, **options)
    assert np.array_equal(decode_array(path), RGB)
    tensor = decode_image(path)
    assert tensor.shape == (3, 24, 32) and tensor.is_contiguous()
    assert np.array_equal(tensor.permute(1, 2, 0).numpy(), RGB)


def test_jpeg_decodes_within_compression_tolerance(tmp_path):
    smooth = np.zeros((32, 32, 3), dtype=np.uint8)
    smooth[..., 0] = np.arange(32)[None, :] * 8  # a ramp: JPEG keeps it within a few levels
    smooth[..., 1] = 120
    smooth[..., 2] = np.arange(32)[:, None] * 4
    path = tmp_path / "ramp.jpg"
    Image.fromarray(smooth).save(path, quality=95)
    difference = np.abs(decode_array(path).astype(int) - smooth.astype(int))
    assert difference.mean() < 2 and difference.max() <= 12


def test_every_listed_suffix_is_decodable_including_bmp_and_webp():
    assert {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"} <= set(IMAGE_SUFFIXES)


def test_grayscale_and_palette_become_rgb_with_the_stored_values(tmp_path, caplog):
    gray = RGB[..., 0]
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    palette = Image.fromarray(RGB).quantize(colors=16)
    palette.save(tmp_path / "palette.png")
    with caplog.at_level(logging.WARNING):
        decoded_gray = decode_array(tmp_path / "gray.png")
        decoded_palette = decode_array(tmp_path / "palette.png")
    assert np.array_equal(decoded_gray, np.repeat(gray[..., None], 3, axis=2))
    assert np.array_equal(decoded_palette, np.asarray(palette.convert("RGB")))
    assert "gray.png is a grayscale image" in caplog.text and "palette.png is a palette image" in caplog.text


def test_rgba_keeps_its_colour_samples(tmp_path):
    rgba = np.concatenate([RGB, RNG.integers(0, 256, size=(24, 32, 1), dtype=np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    assert np.array_equal(decode_array(tmp_path / "rgba.png"), RGB)
    assert np.array_equal(decode_array(tmp_path / "rgba.tif"), RGB)


# Hand-worked 16-bit -> 8-bit values: v * 255 / 65535 = v / 257.
SIXTEEN = np.array([[0, 257, 25700, 65535], [32896, 514, 65278, 12850]], dtype=np.uint16)
EIGHT = np.array([[0, 1, 100, 255], [128, 2, 254, 50]], dtype=np.uint8)


def test_16_bit_grayscale_png_and_tiff_scale_to_8_bit(tmp_path):
    Image.fromarray(SIXTEEN).save(tmp_path / "g16.png")  # Pillow writes I;16 as a 16-bit PNG
    tifffile.imwrite(tmp_path / "g16.tif", SIXTEEN)
    for name in ("g16.png", "g16.tif"):
        decoded = decode_array(tmp_path / name)
        assert np.array_equal(decoded, np.repeat(EIGHT[..., None], 3, axis=2)), name


def test_16_bit_rgb_png_scales_within_one_level(tmp_path):
    # 16-bit RGB, colour type 2: each row is a filter byte (0) then R, G, B big-endian samples.
    rgb16 = np.stack([SIXTEEN, SIXTEEN[::-1], SIXTEEN[:, ::-1]], axis=2)  # (2, 4, 3)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)
    path = tmp_path / "rgb16.png"
    path.write_bytes(hand_png(4, 2, 16, 2, rows))
    expected = np.stack([EIGHT, EIGHT[::-1], EIGHT[:, ::-1]], axis=2)
    assert np.abs(decode_array(path).astype(int) - expected).max() <= 1


def test_16_bit_rgb_tiff_is_read_with_tifffile_and_scaled_exactly(tmp_path):
    rgb16 = np.stack([SIXTEEN, SIXTEEN[::-1], SIXTEEN[:, ::-1]], axis=2)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16, photometric="rgb")
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb16, 2, 0), photometric="rgb", planarconfig="separate")
    expected = np.stack([EIGHT, EIGHT[::-1], EIGHT[:, ::-1]], axis=2)
    assert np.array_equal(decode_array(tmp_path / "rgb16.tif"), expected)
    assert np.array_equal(decode_array(tmp_path / "planar.tif"), expected)


def test_float_tiff_in_0_1_scales_to_0_255(tmp_path):
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    tifffile.imwrite(tmp_path / "float.tif", values)
    assert decode_array(tmp_path / "float.tif")[0, :, 0].tolist() == [0, 128, 255]


def test_multi_page_tiff_gives_its_first_page(tmp_path):
    second = 255 - RGB
    with tifffile.TiffWriter(tmp_path / "pages.tif") as writer:
        writer.write(RGB, photometric="rgb")
        writer.write(second, photometric="rgb")
    assert np.array_equal(decode_array(tmp_path / "pages.tif"), RGB)


def bomb_png(path: Path, side: int = 40000) -> Path:
    """A tiny PNG whose header declares side x side 1-bit pixels (a few rows of real data only)."""
    path.write_bytes(hand_png(side, side, 1, 0, b"\x00" * (side // 8 + 1) * 4))
    return path


def test_decompression_bomb_is_refused_from_its_header_naming_the_file(tmp_path):
    path = bomb_png(tmp_path / "bomb.png")
    assert path.stat().st_size < 2000
    with pytest.raises(ValueError, match=r"bomb\.png declares 40000 x 40000 pixels.*HISTOTOKEN_MAX_PIXELS"):
        decode_array(path)


def test_bomb_costs_no_memory_in_a_fresh_process(tmp_path):
    path = bomb_png(tmp_path / "bomb.png")
    result = run_isolated(f"""
        import resource
        from histotoken.data.decode import decode_array
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            decode_array({str(path)!r})
        except ValueError as error:
            print("refused:", error)
        print("grew_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused:" in result.stdout and "bomb.png" in result.stdout
    grew_kb = int(result.stdout.split("grew_kb")[1])
    assert grew_kb < 200_000  # the declared image is 1.6 GB at one byte a pixel


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    Image.fromarray(RGB).save(tmp_path / "small.png")  # 32 x 24 = 768 pixels
    monkeypatch.setenv(MAX_PIXELS_ENV, "700")
    with pytest.raises(ValueError, match="small.png declares 32 x 24 pixels, more than the limit of 700"):
        decode_array(tmp_path / "small.png")
    assert decode_array(tmp_path / "small.png", limit=768).shape == (24, 32, 3)
    monkeypatch.setenv(MAX_PIXELS_ENV, "many")
    with pytest.raises(ValueError, match="HISTOTOKEN_MAX_PIXELS"):
        decode_array(tmp_path / "small.png")


def truncated_png(path: Path) -> Path:
    """A PNG whose IDAT holds a third of the compressed data its header needs; every chunk and CRC valid."""
    big = RNG.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(big).save(path)
    whole = path.read_bytes()
    path.write_bytes(cut_idat(whole, keep=len(zlib.compress(big.tobytes())) // 3))
    return path


def test_truncated_png_is_an_error_naming_the_file_never_a_crash(tmp_path):
    path = truncated_png(tmp_path / "short data.png")
    result = run_isolated(f"""
        from histotoken.data.decode import decode_image
        from histotoken.data.store import load_image
        for read in (decode_image, lambda p: load_image(p, 16)):
            try:
                read({str(path)!r})
                print("decoded")
            except ValueError as error:
                print("refused:", error)
    """)
    assert result.returncode == 0, f"decoder crashed (rc {result.returncode}): {result.stderr[-2000:]}"
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("refused:") and "short data.png" in line for line in lines)


def test_index_and_store_keep_the_good_files_of_a_folder_with_bad_ones(tmp_path):
    from histotoken.data.dataset import ImageStore
    from histotoken.data.index import load_index

    root = tmp_path / "tiles"
    for label, colour in (("benign", 40), ("malignant", 200)):
        for i, suffix in enumerate((".png", ".bmp", ".webp", ".tif")):
            (root / label).mkdir(parents=True, exist_ok=True)
            image = np.full((20, 20, 3), colour, dtype=np.uint8)
            Image.fromarray(image).save(root / label / f"tile{i}{suffix}", **({"lossless": True} if suffix == ".webp" else {}))
    truncated = truncated_png(root / "benign" / "short.png")
    bomb = bomb_png(root / "malignant" / "bomb.png")
    index = load_index(root, refresh=True)
    reasons = dict(index.skipped)
    assert len(index.frame) == 8 and set(reasons) == {str(truncated), str(bomb)}
    assert "40000 x 40000" in reasons[str(bomb)] and "short.png" in reasons[str(truncated)]
    # a file that breaks after indexing is skipped by the store, and the others are kept
    frame = index.frame.sort_values("path").reset_index(drop=True)
    victim = frame["path"].iloc[0]
    Path(victim).write_bytes(truncated.read_bytes())
    store = ImageStore.build(frame, 16, cache_dir=tmp_path / "cache")
    assert [path for path, _ in store.skipped] == [victim] and len(store.frame) == 7
    expected = np.where(store.frame["label"].to_numpy() == "benign", 40, 200)
    assert np.array_equal(store.images.float().mean(dim=(1, 2, 3)).numpy(), expected)


def test_index_check_and_training_decode_accept_the_same_files(tmp_path):
    """Checks and decoding are one function: the store decodes exactly the files the index accepted."""
    from histotoken.data.sources import get_source
    from histotoken.data.store import build_store

    root = tmp_path / "mixed"
    (root / "a").mkdir(parents=True)
    Image.fromarray(RGB).save(root / "a" / "ok.png")
    Image.fromarray(RGB).save(root / "a" / "ok.tif")
    (root / "b").mkdir()
    tifffile.imwrite(root / "b" / "deep.tif", np.stack([SIXTEEN] * 3, axis=2), photometric="rgb")
    truncated_png(root / "b" / "short.png")
    bomb_png(root / "b" / "bomb.png")
    (root / "b" / "empty.png").write_bytes(b"")
    files = sorted(str(p) for p in root.rglob("*.*"))
    index = get_source("imagefolder").scan(root)
    store = build_store(files, 8, cache_dir=tmp_path / "cache")
    refused_by_store = {store.keys[row] for row in store.errors}
    assert refused_by_store == {path for path, _ in index.skipped}
    assert set(index.frame["path"]) == set(files) - refused_by_store


def test_predict_scores_every_good_file_beside_broken_deep_and_huge_ones(tmp_path):
    """One predict call over good files of every format and hostile files: a row each, errors only where due."""
    from tests.run_fixture import make_run

    run_dir = make_run(tmp_path / "run", "resnet18", ("a", "b"), 32)
    folder = tmp_path / "inputs"
    folder.mkdir()
    for suffix in (".png", ".jpg", ".bmp", ".tif", ".webp"):
        Image.fromarray(RGB).save(folder / f"good{suffix}")
    Image.fromarray(SIXTEEN).save(folder / "deep16.png")
    truncated_png(folder / "short.png")
    bomb_png(folder / "bomb.png")
    out = tmp_path / "predictions.csv"
    result = run_isolated(f"""
        from histotoken.cli.main import main
        raise SystemExit(main(["predict", {str(run_dir)!r}, {str(folder)!r}, "--out", {str(out)!r}]))
    """)
    assert result.returncode == 0, f"rc {result.returncode}: {result.stderr[-2000:]}"
    import pandas as pd

    table = pd.read_csv(out, keep_default_na=False).set_index("path")
    errors = {Path(path).name: error for path, error in table["error"].items()}
    assert len(errors) == 8
    assert "40000 x 40000" in errors.pop("bomb.png") and "short.png" in errors.pop("short.png")
    assert all(error == "" for error in errors.values()), errors
    assert (table.loc[[p for p in table.index if Path(p).name in errors], "predicted_class"] != "").all()
