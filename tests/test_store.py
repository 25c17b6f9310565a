"""The decoded store: a memory-mapped uint8 file per image list, size and preprocessing, decoded once."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import histotoken.data.store as store_module
from histotoken.data.dataset import ImageStore, load_image
from histotoken.data.index import load_index


@pytest.fixture()
def decodes(monkeypatch):
    """Counts the images actually decoded (cache hits decode nothing)."""
    calls: list[str] = []
    original = store_module.decode_resized

    def counting(key, img_size):
        calls.append(key)
        return original(key, img_size)

    monkeypatch.setattr(store_module, "decode_resized", counting)
    return calls


@pytest.fixture(scope="module")
def frame(synthetic_root):
    return load_index(synthetic_root).frame.sort_values("path").head(16).reset_index(drop=True)


def test_store_holds_the_same_pixels_as_decoding_each_image(frame, tmp_path):
    store = ImageStore.build(frame, 24, cache_dir=tmp_path)
    expected = torch.stack([load_image(path, 24) for path in frame["path"]])
    assert store.images.dtype == torch.uint8 and torch.equal(store.images, expected)
    assert list(store.frame["path"]) == list(frame["path"]) and store.skipped == []


def test_second_build_is_a_cache_hit_and_universe_rows_are_selected(frame, tmp_path, decodes):
    train, test = frame.iloc[::2], frame.iloc[1::2]
    first = ImageStore.build(train, 24, universe=frame, cache_dir=tmp_path)
    assert len(decodes) == len(frame)  # the whole universe, once
    second = ImageStore.build(test, 24, universe=frame, cache_dir=tmp_path)
    again = ImageStore.build(frame, 24, cache_dir=tmp_path)  # same image list in another order of rows
    assert len(decodes) == len(frame)
    assert torch.equal(second.images[0], load_image(test["path"].iloc[0], 24))
    assert torch.equal(first.images[-1], load_image(train["path"].iloc[-1], 24))
    assert list(second.frame["path"]) == list(test["path"]) and len(again.frame) == len(frame)
    assert len(list(tmp_path.glob("*.npy"))) == 1


def test_other_size_or_preprocessing_makes_another_store(frame, tmp_path, decodes):
    ImageStore.build(frame, 24, cache_dir=tmp_path)
    ImageStore.build(frame, 16, cache_dir=tmp_path)
    inverted = ImageStore.build(frame, 24, cache_dir=tmp_path, preprocess=lambda x: 255 - x, preprocess_key="invert")
    assert len(decodes) == 3 * len(frame)
    assert len(list(tmp_path.glob("*.npy"))) == 3
    assert torch.equal(inverted.images[3], 255 - load_image(frame["path"].iloc[3], 24))
    with pytest.raises(ValueError, match="preprocess_key"):
        ImageStore.build(frame, 24, cache_dir=tmp_path, preprocess=lambda x: x)


def test_unreadable_image_is_skipped_and_listed(frame, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    broken = frame.head(4).copy()
    broken.loc[2, "path"] = str(bad)
    store = ImageStore.build(broken, 24, cache_dir=tmp_path / "stores")
    assert [path for path, _ in store.skipped] == [str(bad)]
    assert len(store.images) == 3 and str(bad) not in set(store.frame["path"])
    reopened = ImageStore.build(broken, 24, cache_dir=tmp_path / "stores")  # listed again from the manifest
    assert [path for path, _ in reopened.skipped] == [str(bad)]


def test_truncated_store_file_is_rebuilt(frame, tmp_path, decodes):
    ImageStore.build(frame, 24, cache_dir=tmp_path)
    (npy,) = tmp_path.glob("*.npy")
    with open(npy, "r+b") as handle:
        handle.truncate(npy.stat().st_size // 2)
    store = ImageStore.build(frame, 24, cache_dir=tmp_path)
    assert len(decodes) == 2 * len(frame)
    assert torch.equal(store.images[-1], load_image(frame["path"].iloc[-1], 24))


def test_store_without_manifest_is_rebuilt(frame, tmp_path, decodes):
    ImageStore.build(frame, 24, cache_dir=tmp_path)
    for manifest in tmp_path.glob("*.json"):
        manifest.unlink()  # as if the builder died before writing it
    ImageStore.build(frame, 24, cache_dir=tmp_path)
    assert len(decodes) == 2 * len(frame)


def test_two_builders_at_once_decode_once_and_agree(frame, tmp_path, decodes, monkeypatch):
    original = store_module.decode_resized

    def slow(key, img_size):  # keeps the first builder busy while the second arrives
        time.sleep(0.01)
        return original(key, img_size)

    monkeypatch.setattr(store_module, "decode_resized", slow)
    results = {}

    def build(name):
        results[name] = ImageStore.build(frame, 24, cache_dir=tmp_path).images.clone()

    threads = [threading.Thread(target=build, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.equal(results["a"], results["b"])
    assert len(decodes) == len(frame)  # the second builder waited for the first and opened its store
    assert len(list(tmp_path.glob("*.npy"))) == 1 and not list(tmp_path.glob("*.tmp"))


def test_worker_processes_decode_the_same_pixels(synthetic_root, tmp_path):
    frame = load_index(synthetic_root).frame.sort_values("path").head(40)
    serial = ImageStore.build(frame, 16, cache_dir=tmp_path / "serial")
    parallel = ImageStore.build(frame, 16, cache_dir=tmp_path / "parallel", workers=2)
    assert torch.equal(serial.images, parallel.images)


def test_temporary_file_of_a_dead_builder_is_removed_on_the_next_build(frame, tmp_path):
    import os

    from histotoken.data.store import store_key

    name = store_key(frame["path"].tolist(), 24)
    stale, fresh = tmp_path / f".{name}.999.dead.npy.tmp", tmp_path / f".{name}.998.busy.npy.tmp"
    stale.write_bytes(b"half a store")
    fresh.write_bytes(b"another builder, still writing")
    os.utime(stale, (0, 0))  # days old
    ImageStore.build(frame, 24, cache_dir=tmp_path)
    assert not stale.exists() and fresh.exists()


def _build_in_child(frame, cache_dir) -> int:
    """Build the store in a child process; return how many images this process decoded."""
    calls = []
    original = store_module.decode_resized

    def slow_counting(key, img_size):
        calls.append(key)
        time.sleep(0.01)
        return original(key, img_size)

    store_module.decode_resized = slow_counting
    ImageStore.build(frame, 24, cache_dir=cache_dir)
    return len(calls)


def test_two_processes_building_one_store_leave_one_whole_store(frame, tmp_path):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        decoded = list(pool.map(_build_in_child, [frame, frame], [tmp_path, tmp_path]))
    assert sorted(decoded) == [0, len(frame)]  # one process decoded, the other opened its result
    store = ImageStore.build(frame, 24, cache_dir=tmp_path)
    assert torch.equal(store.images, torch.stack([load_image(path, 24) for path in frame["path"]]))
    assert len(list(tmp_path.glob("*.npy"))) == 1 and not list(tmp_path.glob(".*.tmp"))
