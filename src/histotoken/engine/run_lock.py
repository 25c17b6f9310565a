"""One writer per run folder: ``train``, ``evaluate`` and ``export`` lock the run folder they write.

The lock is ``fcntl.flock`` on ``RUN_DIR/writer.lock`` (``LOCK_EX | LOCK_NB``). The kernel drops it
when its process ends, however it ends (kill -9 included), so a lock left by a dead process is
simply taken over; nothing has to judge staleness. The file itself stays and records the last
holder (``host``, ``pid``, ``since`` in UTC, ``command``), which is what a refused process reports.
Within one process the lock is re-entrant (``train`` evaluates the run it trained while holding it).
Only the first process of a multi-process (DDP) run takes it: the others are part of the same run.

Grid workers additionally claim runs with ``claim.json`` (``experiments/locks.py``): that claim
decides which worker trains a run; this lock guards the folder against any second writer, the
command line included. flock works on local file systems and on NFSv4; on a file system without
locks the lock is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

RUN_LOCK = "writer.lock"

_held: dict[Path, tuple[int, int]] = {}  # resolved lock path -> (file descriptor, depth) in this process
_held_guard = threading.Lock()


class RunFolderBusy(ValueError):
    """Another process is writing the run folder."""


def _holder_text(path: Path) -> str:
    try:
        record = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, json.JSONDecodeError):
        record = {}
    return (f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, since {record.get('since', '?')}"
            f"{', ' + record['command'] if record.get('command') else ''}")


@contextlib.contextmanager
def run_lock(run_dir: str | Path, command: str) -> Iterator[None]:
    """Hold the run folder's writer lock while the body runs; :class:`RunFolderBusy` when another process has it.

    ``run_dir`` must exist (``train`` creates it first); for a folder that does not exist the body runs unguarded.
    """
    from histotoken.engine.ranks import is_global_zero

    if not is_global_zero():
        yield
        return
    run_dir = Path(run_dir)
    if not run_dir.is_dir():  # nothing to guard yet (the command reports a missing run folder itself)
        yield
        return
    path = (run_dir / RUN_LOCK).resolve()
    with _held_guard:
        if path in _held:
            descriptor, depth = _held[path]
            _held[path] = (descriptor, depth + 1)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            _release(path)
        return

    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise RunFolderBusy(
            f"{run_dir} is being written by another histotoken process ({_holder_text(path)}); "
            "wait for it to finish, or stop it, then run this again"
        ) from None
    except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(descriptor)
            raise
        logger.warning("%s: this file system has no locks (%s); not guarding against a second writer", path, error)
    previous = _holder_text(path) if os.fstat(descriptor).st_size else None
    if previous:
        logger.debug("took the writer lock of %s (last holder: %s)", run_dir, previous)
    record = {
        "host": socket.gethostname(), "pid": os.getpid(), "command": command,
        "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(record).encode("utf-8"), 0)
    with _held_guard:
        _held[path] = (descriptor, 1)
    try:
        yield
    finally:
        _release(path)


def _release(path: Path) -> None:
    with _held_guard:
        descriptor, depth = _held[path]
        if depth > 1:
            _held[path] = (descriptor, depth - 1)
            return
        del _held[path]
    os.close(descriptor)  # closing the only descriptor releases the flock


def writer_alive(run_dir: str | Path) -> bool:
    """True while some process holds the run folder's writer lock (this process included)."""
    path = (Path(run_dir) / RUN_LOCK).resolve()
    with _held_guard:
        if path in _held:
            return True
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # no lock file: nobody ever wrote the folder under a lock
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False  # a file system without locks: nothing can be told
    finally:
        os.close(descriptor)  # also drops the shared lock we may have taken
    return False
