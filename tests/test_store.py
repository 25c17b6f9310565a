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


def test_temporaries_no_builder_is_writing_are_removed_on_the_next_build(frame, tmp_path):
    import fcntl
    import os

    from histotoken.data.store import store_key

    name = store_key(frame["path"].tolist(), 24)
    own = tmp_path / f".{name}.0a0a0a0a-999999.dead.npy.tmp"  # this store, builder killed a minute ago
    free = tmp_path / f".{'1' * 24}.0a0a0a0a-999998.dead.npy.tmp"  # another store, nobody holds its lock
    (tmp_path / f"{'1' * 24}.lock").touch()
    busy = tmp_path / f".{'2' * 24}.0a0a0a0a-999997.busy.npy.tmp"  # another store whose builder is alive
    for path in (own, free, busy):
        path.write_bytes(b"half a store")
    with open(tmp_path / f"{'2' * 24}.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a live builder holds this lock
        ImageStore.build(frame, 24, cache_dir=tmp_path)
    assert not own.exists() and not free.exists() and busy.exists()
    assert os.path.getsize(busy) == len(b"half a store")


def test_temporary_of_a_dead_process_on_this_host_is_removed_even_without_locks(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from histotoken.data.store import _HOST, remove_dead_temporaries

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(child.stdout)  # that process has exited
    dead = tmp_path / f".{'3' * 24}.{_HOST}-{dead_pid}.x.npy.tmp"
    alive = tmp_path / f".{'4' * 24}.{_HOST}-{os.getpid()}.x.npy.tmp"
    for path in (dead, alive):
        path.write_bytes(b"partial")
    monkeypatch.setattr(store_module, "_lock_is_free", lambda path: False)  # e.g. a file system without locks
    assert remove_dead_temporaries(tmp_path) == [dead]
    assert alive.exists()


def test_full_disk_falls_back_to_memory_with_a_warning_naming_the_cache(frame, tmp_path, monkeypatch, caplog):
    import errno
    import logging

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.os, "posix_fallocate", no_space)
    with caplog.at_level(logging.WARNING):
        store = ImageStore.build(frame, 24, cache_dir=tmp_path)
    assert torch.equal(store.images, torch.stack([load_image(path, 24) for path in frame["path"]]))
    assert "No space left on device" in caplog.text and "HISTOTOKEN_CACHE" in caplog.text and str(tmp_path) in caplog.text
    assert not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob(".*.tmp"))


def test_full_disk_and_no_memory_is_one_line_naming_the_cache(frame, tmp_path, monkeypatch):
    import errno

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(store_module.os, "posix_fallocate", no_space)
    monkeypatch.setattr(store_module, "_decode_into", out_of_memory)
    with pytest.raises(ValueError, match=f"{tmp_path}.*No space left.*HISTOTOKEN_CACHE"):
        ImageStore.build(frame, 24, cache_dir=tmp_path)


def test_store_on_a_tiny_tmpfs_falls_back_to_memory_without_sigbus(synthetic_root, tmp_path):
    """A real full file system: the build must not die of SIGBUS writing through the memory map."""
    import os
    import subprocess
    import sys

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs this as root)")
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (no CAP_SYS_ADMIN)")
    try:
        code = f"""
import logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
from histotoken.data.index import load_index
from histotoken.data.dataset import ImageStore
frame = load_index({str(synthetic_root)!r}).frame.head(40)
store = ImageStore.build(frame, 32, cache_dir={str(mount)!r})  # 40 x 3 x 32 x 32 = 123 kB > 64 kB
print("images", tuple(store.images.shape))
"""
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
    assert result.returncode == 0, f"rc {result.returncode} (SIGBUS is -7): {result.stderr[-1500:]}"
    assert "images (40, 3, 32, 32)" in result.stdout and "into memory" in result.stdout


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
