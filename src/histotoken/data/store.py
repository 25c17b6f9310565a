"""Decode each image once per study: a uint8 store as a memory-mapped ``.npy`` file in the cache.

A store holds the images of a sorted list of index keys (``sources.read_image`` reads any key;
``load_image`` here decodes and resizes one, exactly as the store does),
decoded, resized to ``img_size`` x ``img_size`` and optionally preprocessed (e.g. stain
normalisation), as one ``(N, 3, S, S)`` uint8 array. It lives in ``$HISTOTOKEN_CACHE/stores``
(see ``data.index.cache_dir``) and is named by a hash of

- every key with its file's size and modification time (a changed file means a new store),
- the image size and the ``preprocess_key`` (a different method or target means a new store),

so every run and evaluation of a study (all seeds, folds, train domains and test domains share
the study's image list) opens the same file, also from other processes, and the OS page cache
shares its pages between them.

Files, for a store named KEY (see docs/formats.md):

- ``KEY.npy``: the images, written to a temporary file and renamed into place when complete;
- ``KEY.json``: the manifest (keys in store order, which rows could not be decoded and why, shape,
  byte size), written last. A store without a manifest, or whose ``.npy`` size differs from the
  manifest's, is torn and is rebuilt;
- ``KEY.lock``: held (``fcntl.flock``) while one process builds, so a second waits for the first
  and then opens its result; where locks are unavailable both build and the last rename wins
  (both files hold the same bytes).
- ``.KEY.<host>-<pid>.<random>.npy.tmp``: the file being written. Its blocks are reserved
  (``posix_fallocate``) before any pixel is written through the memory map, so a full disk is an
  ``OSError`` at the start, never a SIGBUS mid-build. A temporary left by a killed builder is removed
  by the next build: its store's lock is free, or its process (on this host) is gone.

When the cache cannot be written (full disk, read-only folder), the images are decoded into memory
for this process with a warning naming the folder and ``$HISTOTOKEN_CACHE``; when memory does not
suffice either, the error says the same in one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from histotoken.data.sources import read_image, split_key
from histotoken.formats import STORES_DIR
from histotoken.io import atomic_write_json

logger = logging.getLogger(__name__)

STORE_VERSION = 1
CHUNK = 32  # images per task sent to a decoding worker


class PreprocessSkipped(Exception):
    """Raised by a preprocess function that cannot handle one image (e.g. stain normalisation of a
    blank tile); the store keeps that image as decoded and warns, naming its key."""


def default_store_dir() -> Path:
    from histotoken.data.index import cache_dir

    return cache_dir() / STORES_DIR


def load_image(key: str, img_size: int) -> torch.Tensor:
    """Decode an index key (an image file, a CIFAR-10 record, a tile) to (3, img_size, img_size) uint8.

    Decoding is :mod:`histotoken.data.decode`'s (through the key's source): grayscale, RGBA and deeper
    images become 8-bit RGB with a warning naming the file; unreadable, truncated, empty or oversized
    files raise ValueError naming the file.
    """
    from torchvision.transforms.v2 import functional as F

    image = read_image(str(key))
    if tuple(image.shape[-2:]) == (img_size, img_size):
        return image
    return F.resize(image, [img_size, img_size], antialias=True)


def decode_resized(key: str, img_size: int) -> torch.Tensor:
    """Decode one index key to a (3, img_size, img_size) uint8 tensor; ValueError names the key."""
    return load_image(key, img_size)


def store_key(keys: Sequence[str], img_size: int, preprocess_key: str = "") -> str:
    """Hash of the sorted keys (with their files' sizes and mtimes), the size and the preprocessing."""
    digest = hashlib.sha1(f"v{STORE_VERSION};size={img_size};preprocess={preprocess_key}\n".encode())
    stats: dict[str, str] = {}
    for key in keys:
        base, _ = split_key(key)
        if base not in stats:
            try:
                stat = os.stat(base)
                stats[base] = f"{stat.st_size}:{stat.st_mtime_ns}"
            except OSError:
                stats[base] = "missing"
        digest.update(f"{key}:{stats[base]}\n".encode())
    return digest.hexdigest()[:24]


@dataclasses.dataclass
class DecodedStore:
    """An opened store: images (memory-mapped) and, per row, its key and whether it was decoded."""

    images: np.ndarray  # (N, 3, S, S) uint8, memory-mapped copy-on-write
    keys: list[str]
    errors: dict[int, str]  # row -> reason it could not be decoded (that row is zeros)
    path: Path


def open_store(directory: Path, name: str) -> DecodedStore | None:
    """The complete store ``name`` in ``directory``, or None when it is absent, torn or truncated."""
    npy, manifest_path = directory / f"{name}.npy", directory / f"{name}.json"
    if not (npy.is_file() and manifest_path.is_file()):
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("version") != STORE_VERSION or npy.stat().st_size != manifest["bytes"]:
            logger.warning("decoded store %s is incomplete or damaged; rebuilding it", npy)
            return None
        images = np.load(npy, mmap_mode="c")
    except (OSError, ValueError, KeyError) as error:
        logger.warning("cannot open decoded store %s (%s); rebuilding it", npy, error)
        return None
    if list(images.shape) != manifest["shape"] or images.dtype != np.uint8:
        logger.warning("decoded store %s has shape %s, its manifest says %s; rebuilding it", npy, images.shape, manifest["shape"])
        return None
    errors = {int(row): reason for row, reason in manifest["errors"].items()}
    return DecodedStore(images, manifest["keys"], errors, npy)


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[bool]:
    """An exclusive advisory lock while building; yields whether it is held (False where locks are missing)."""
    try:
        import fcntl

        handle = open(path, "a+")  # noqa: SIM115 - held for the whole block
    except ImportError:
        yield False
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            held = True
        except OSError:
            held = False  # e.g. a network file system without locks: the atomic rename still keeps the store whole
        yield held
    finally:
        handle.close()


def _lock_is_free(path: Path) -> bool:
    """True when no process holds the build lock ``path`` (or it does not exist); False when unsure."""
    if not path.exists():
        return True
    try:
        import fcntl

        with open(path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
            return True
    except (ImportError, OSError):
        return False


def build_store(
    keys: Sequence[str],
    img_size: int,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    preprocess_key: str = "",
    workers: int = 0,
    cache_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DecodedStore:
    """Open the store of ``keys`` (sorted and de-duplicated here), decoding it first if it is not cached.

    ``preprocess`` runs on each decoded, resized uint8 image before it is stored; ``preprocess_key``
    must name it (method and target) since it is part of the store's name. ``workers`` > 0 decodes
    in that many processes (preprocessing stays in this one).
    """
    if preprocess is not None and not preprocess_key:
        raise ValueError("a preprocess function needs a preprocess_key naming it (e.g. 'macenko:<target hash>')")
    keys = sorted(set(map(str, keys)))
    if not keys:
        raise ValueError("no images to decode; the selection is empty")
    directory = Path(cache_dir) if cache_dir is not None else default_store_dir()
    name = store_key(keys, img_size, preprocess_key)
    found = open_store(directory, name)
    if found is not None:
        logger.info("decoded store %s: %d images at %d px (cached)", found.path, len(keys), img_size)
        return found
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _build_lock(directory / f"{name}.lock") as locked:
            found = open_store(directory, name)  # another process may have finished it meanwhile
            if found is not None:
                return found
            remove_dead_temporaries(directory, name if locked else None)
            _write_store(directory, name, keys, img_size, preprocess, preprocess_key, workers, progress)
    except OSError as error:
        return _build_in_memory(directory, name, keys, img_size, preprocess, workers, progress, error)
    found = open_store(directory, name)
    if found is None:
        raise RuntimeError(f"decoded store {directory / name}.npy was written but cannot be opened; delete it and retry")
    return found


def _build_in_memory(directory, name, keys, img_size, preprocess, workers, progress, error: OSError) -> DecodedStore:
    """The fallback when the cache cannot be written: decode into this process's memory, or one clear error."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    size_gb = len(keys) * 3 * img_size * img_size / 1e9
    logger.warning(
        "cannot write the decoded-image cache in %s (%s); decoding %d images (%.2f GB) into memory for this "
        "process only. Free space there or set HISTOTOKEN_CACHE to a writable folder with room",
        directory, reason, len(keys), size_gb,
    )
    try:
        images = np.zeros((len(keys), 3, img_size, img_size), dtype=np.uint8)
        errors = _decode_into(images, keys, img_size, preprocess, workers, progress)
    except MemoryError:
        raise ValueError(
            f"the decoded-image cache {directory} cannot be written ({reason}) and {size_gb:.2f} GB of images do "
            "not fit in memory; free space there or set HISTOTOKEN_CACHE to a writable folder with room"
        ) from None
    return DecodedStore(images, keys, errors, directory / f"{name}.npy")


STALE_TEMP_SECONDS = 24 * 3600  # a temporary file this old belongs to a builder that died, whatever else holds
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _temporary_name(name: str) -> str:
    return f".{name}.{_HOST}-{os.getpid()}.{uuid.uuid4().hex[:8]}.npy.tmp"


def _owner_is_dead(tmp: Path) -> bool:
    """True when the temporary's name says it was made on this host by a process that no longer exists."""
    parts = tmp.name.split(".")  # ['', KEY, HOST-PID, RANDOM, 'npy', 'tmp']
    host, _, pid = parts[2].partition("-") if len(parts) == 6 else ("", "", "")
    if host != _HOST or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists but belongs to another user
    return False


def remove_dead_temporaries(directory: Path, held: str | None = None) -> list[Path]:
    """Delete temporaries that no builder is writing: those of store ``held`` (whose lock this process holds),
    those whose store lock is free, those of a dead process on this host and any older than a day."""
    removed = []
    now = time.time()
    for tmp in directory.glob(".*.npy.tmp"):
        store = tmp.name[1:].split(".")[0]
        with contextlib.suppress(OSError):
            if (
                store == held
                or _lock_is_free(directory / f"{store}.lock")
                or _owner_is_dead(tmp)
                or now - tmp.stat().st_mtime > STALE_TEMP_SECONDS
            ):
                tmp.unlink()
                removed.append(tmp)
    if removed:
        logger.info("removed %d temporary file(s) left by killed store builds in %s", len(removed), directory)
    return removed


def _reserve(path: Path, size: int) -> None:
    """Allocate ``size`` bytes of ``path`` now, so that writes through a memory map cannot hit a full disk."""
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            _write_zeros(handle, size)  # no fallocate here: write every block instead
        except AttributeError:  # no posix_fallocate on this platform
            _write_zeros(handle, size)


def _write_zeros(handle, size: int, block: int = 1 << 24) -> None:
    handle.seek(0)
    zeros = bytes(block)
    written = 0
    while written < size:
        count = min(block, size - written)
        handle.write(zeros[:count])
        written += count
    handle.flush()
    os.fsync(handle.fileno())


def _write_store(directory, name, keys, img_size, preprocess, preprocess_key, workers, progress) -> None:
    npy = directory / f"{name}.npy"
    tmp = directory / _temporary_name(name)
    shape = (len(keys), 3, img_size, img_size)
    logger.info("decoding %d images at %d px into %s", len(keys), img_size, npy)
    try:
        header = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        offset = header.offset
        del header
        _reserve(tmp, offset + int(np.prod(shape)))  # the header, then every pixel byte
        images = np.lib.format.open_memmap(tmp, mode="r+")
        errors = _decode_into(images, keys, img_size, preprocess, workers, progress)
        images.flush()
        del images
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, npy)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    atomic_write_json(directory / f"{name}.json", {
        "version": STORE_VERSION, "img_size": img_size, "preprocess_key": preprocess_key,
        "shape": list(shape), "bytes": npy.stat().st_size, "keys": keys,
        "errors": {str(row): reason for row, reason in errors.items()},
    })


def _decode_into(images, keys, img_size, preprocess, workers, progress) -> dict[int, str]:
    """Fill ``images`` row by row; return {row: reason} for keys that could not be decoded."""
    errors: dict[int, str] = {}
    done = 0
    for row, result in _decoded(keys, img_size, workers):
        if isinstance(result, str):
            errors[row] = result
            logger.warning("left out: %s", result)
        else:
            image = torch.as_tensor(result)
            if preprocess is not None:
                try:
                    image = preprocess(image)
                except PreprocessSkipped as error:
                    logger.warning("%s is stored without preprocessing: %s", keys[row], error)
            images[row] = image.numpy()
        done += 1
        if progress is not None:
            progress(done, len(keys))
    return errors


def _decoded(keys: Sequence[str], img_size: int, workers: int) -> Iterator[tuple[int, np.ndarray | str]]:
    if workers <= 0 or len(keys) <= CHUNK:
        for row, key in enumerate(keys):
            yield row, _decode_or_reason(key, img_size)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    chunks = [list(keys[start : start + CHUNK]) for start in range(0, len(keys), CHUNK)]
    # fork, as DataLoader workers do (torch resets its thread pool in the child); spawn where there is no fork
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        row = 0
        for results in pool.map(_decode_chunk, chunks, [img_size] * len(chunks)):
            for result in results:
                yield row, result
                row += 1


def _decode_chunk(keys: list[str], img_size: int) -> list[np.ndarray | str]:
    torch.set_num_threads(1)
    return [_decode_or_reason(key, img_size) for key in keys]


def _decode_or_reason(key: str, img_size: int) -> np.ndarray | str:
    try:
        return decode_resized(key, img_size).numpy()
    except ValueError as error:
        return str(error)
