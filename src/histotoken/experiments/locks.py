"""Claims on run folders, so that several grid workers can share one study folder.

Workers may run on different machines over a shared file system (NFS, Lustre, GPFS), or as
SLURM array tasks, Kubernetes indexed jobs or a shell loop. Before a worker trains a run it
claims the run folder:

* **Claim** = create ``RUN_DIR/claim.json`` with ``O_CREAT | O_EXCL``: the file system grants it
  to exactly one worker. It records ``host``, ``pid``, ``started`` (Unix time) and a random
  ``token``. The holder touches the file (its mtime is the **heartbeat**) from a background
  thread every ``heartbeat_interval(stale_after_s)`` seconds while it works, and deletes it when
  the run has ended (finished, failed or interrupted).
* **Stale claim**: a worker that died without deleting its claim (killed, node lost) must not
  block the run forever. A claim is stale when its host is this host and its pid no longer
  exists, or when its heartbeat is older than ``stale_after_s`` (default 10 minutes; the
  heartbeat ticks every quarter of that, at most once a minute). A live worker on another host
  is thus never pre-empted while its heartbeat ticks; a paused or partitioned one is taken over
  after the timeout. Pick a timeout well above the file system's attribute-cache delay.
* **Breaking a stale claim**: rename it to a unique name (atomic; of two workers breaking the
  same claim only one rename succeeds), check that the renamed file is the claim that was judged
  stale (same token) - if another worker had meanwhile made a fresh claim, it is put back with
  ``os.link`` (which never overwrites) - then claim with ``O_EXCL`` as usual.
* ``RUN_DIR/attempts.jsonl`` gets one line per claim that went on to work on the run, written
  only by the claim's holder, so the run's history of workers is in its own folder.
* **Kept claims** (SLURM requeue): a job requeued at its time limit leaves its claim in place
  (:func:`keep`), and the requeued job, which carries the same ``token``, takes it back
  (``claim_run(..., token=TOKEN)``) even while it is not stale, so no other worker starts the run
  in between; until then the claim ages like any other and is taken over once it is stale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from histotoken.formats import RunPaths

logger = logging.getLogger(__name__)

DEFAULT_STALE_AFTER_S = 600.0
_KEPT_TOKENS: set[str] = set()  # claims that release() leaves in place (their job was requeued)


@dataclasses.dataclass(frozen=True)
class Claim:
    """A held claim on one run folder."""

    path: Path
    host: str
    pid: int
    started: float
    token: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. job_id, requeues

    def record(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "started": self.started, "token": self.token, **self.details}


def heartbeat_interval(stale_after_s: float) -> float:
    """How often a holder touches its claim: a quarter of the timeout, between 0.05 s and 60 s."""
    return min(60.0, max(0.05, stale_after_s / 4))


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_stale(record: dict[str, Any], heartbeat: float, stale_after_s: float, now: float | None = None) -> bool:
    """Whether a claim (its JSON ``record`` and its file's mtime ``heartbeat``) may be taken over."""
    now = time.time() if now is None else now
    if record.get("host") == socket.gethostname() and not pid_exists(int(record.get("pid", -1))):
        return True
    return now - heartbeat > stale_after_s


def read_claim(run_dir: str | Path) -> tuple[dict[str, Any], float] | None:
    """The claim's record and heartbeat time, or None when the run is not claimed."""
    path = RunPaths(Path(run_dir)).claim
    try:
        heartbeat = path.stat().st_mtime
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:  # being written this instant, or truncated by a crash
        record = {}
    return record, heartbeat


def active_claim(run_dir: str | Path, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> dict[str, Any] | None:
    """The record of a claim that is held and not stale, or None."""
    found = read_claim(run_dir)
    if found is None or is_stale(found[0], found[1], stale_after_s):
        return None
    return found[0]


def claim_run(run_dir: str | Path, stale_after_s: float = DEFAULT_STALE_AFTER_S, token: str | None = None,
              details: dict[str, Any] | None = None) -> Claim | None:
    """Claim a run folder atomically; None when another worker holds a claim that is not stale.

    ``token``: the claim's identity; a claim left with the same token (:func:`keep`, by an earlier
    start of the same requeued job) is taken back even when it is not stale. ``details`` are
    written into claim.json and attempts.jsonl with the claim (e.g. the SLURM job id).
    """
    path = RunPaths(Path(run_dir)).claim
    path.parent.mkdir(parents=True, exist_ok=True)
    claim = Claim(path, socket.gethostname(), os.getpid(), time.time(), token or uuid.uuid4().hex, dict(details or {}))
    if _create_exclusive(path, claim):
        return claim
    found = read_claim(run_dir)
    if found is None:  # released between our attempt and the read: try once more
        return claim if _create_exclusive(path, claim) else None
    record, heartbeat = found
    own = token is not None and record.get("token") == token
    if not own and not is_stale(record, heartbeat, stale_after_s):
        return None
    if not _break_stale(path, record):
        return None
    if own:
        logger.info("took back the claim on %s kept by an earlier start of this job", path.parent)
    else:
        logger.warning("took over a stale claim on %s (host %s, pid %s)", path.parent, record.get("host"),
                       record.get("pid"))
    return claim if _create_exclusive(path, claim) else None


def keep(token: str) -> None:
    """Make :func:`release` leave the claim with this token in place (its job was requeued and takes it back)."""
    _KEPT_TOKENS.add(token)


def release(claim: Claim) -> None:
    """Delete the claim file if it is still ours (and not kept for a requeued job)."""
    if claim.token in _KEPT_TOKENS:
        logger.info("leaving the claim on %s for the requeued job", claim.path.parent)
        return
    found = read_claim(claim.path.parent)
    if found is not None and found[0].get("token") == claim.token:
        claim.path.unlink(missing_ok=True)


def record_attempt(claim: Claim) -> None:
    """Append the claim to RUN_DIR/attempts.jsonl (only the holder writes there)."""
    with open(RunPaths(claim.path.parent).attempts, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(claim.record()) + "\n")


@contextlib.contextmanager
def heartbeat(claim: Claim, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> Iterator[None]:
    """Touch the claim file from a daemon thread while the body runs."""
    stop = threading.Event()
    interval = heartbeat_interval(stale_after_s)

    def beat() -> None:
        while not stop.wait(interval):
            try:
                os.utime(claim.path)
            except FileNotFoundError:
                logger.warning("the claim %s vanished while its run was in progress", claim.path)
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{claim.path.parent.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _create_exclusive(path: Path, claim: Claim) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(claim.record()))
    return True


def _break_stale(path: Path, stale_record: dict[str, Any]) -> bool:
    """Move a stale claim aside; False when another worker moved it first or it was fresh."""
    aside = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        moved = json.loads(aside.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        moved = {}
    if moved.get("token") != stale_record.get("token"):  # a fresh claim made after our check: put it back
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True
