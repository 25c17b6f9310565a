"""Interruptions are never silent: SIGTERM/SIGINT become ``RunInterrupted``, and the run says so.

Schedulers (SLURM, Kubernetes, most batch systems) send SIGTERM before they stop a job; a person
presses Ctrl-C (SIGINT). Inside :func:`interruptible`, both raise :class:`RunInterrupted` in the
main thread. It derives from ``BaseException`` (like ``KeyboardInterrupt``) so that no
``except Exception`` swallows it, but not from ``KeyboardInterrupt``, which Lightning turns into
``sys.exit(1)``. The training code marks the run ``interrupted`` (its last.ckpt from the last
finished epoch stays resumable), and the command line exits with 128 + the signal number (130 for
SIGINT, 143 for SIGTERM) after one line that says how to resume.

A SLURM job requeued at its time limit (:class:`histotoken.experiments.launch.RunJob`) is leaving on
purpose; :func:`stop_raising` keeps the SIGTERM that the requeue sends from interrupting the
clean-up that saves the run.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


class RunInterrupted(BaseException):
    """The process received SIGTERM or SIGINT; work so far is saved and the same command resumes it."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"received {signal.Signals(self.signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_leaving = False  # set by stop_raising(): the process is already on its way out


def stop_raising() -> None:
    """From now on the signals of :func:`interruptible` are ignored: the process is already leaving
    (e.g. requeued), and a second signal must not cut short the writes that keep the run resumable."""
    global _leaving
    _leaving = True


def _raise(signum: int, frame) -> None:
    if _leaving:
        return
    raise RunInterrupted(signum)


@contextlib.contextmanager
def interruptible(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Within the block, the given signals raise RunInterrupted (previous handlers restored after)."""
    previous = {}
    try:
        for signum in signals:
            previous[signum] = signal.signal(signum, _raise)
    except ValueError:  # not the main thread: leave signal handling to the caller
        previous.clear()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
