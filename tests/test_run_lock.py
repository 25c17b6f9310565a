"""One writer per run folder: a second train/evaluate/export is refused with the holder named; a dead holder's lock is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from histotoken.engine.run_lock import RUN_LOCK, RunFolderBusy, run_lock, writer_alive

HOLD = """
import sys, time
from histotoken.engine.run_lock import run_lock
with run_lock(sys.argv[1], "train"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """A separate process holding the writer lock of tmp_path/run, as a running `histotoken train` would."""
    run = tmp_path / "run"
    run.mkdir()
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "HISTOTOKEN_DEFER_MODELS": "1"})
    assert process.stdout.readline().strip() == "held"
    yield run, process
    if process.poll() is None:
        process.kill()
        process.wait()


def test_a_second_writer_is_refused_with_the_holders_host_pid_and_start(holder):
    import socket

    run, process = holder
    with pytest.raises(RunFolderBusy) as refused, run_lock(run, "evaluate"):
        pass
    message = str(refused.value)
    assert f"pid {process.pid}" in message and f"host {socket.gethostname()}" in message and "since 20" in message
    assert "train" in message and "\n" not in message


def test_a_second_train_on_the_same_out_folder_is_refused_before_it_writes(holder, synthetic_root, capsys):
    from histotoken.cli.main import main

    run, process = holder
    code = main(["train", "--data", str(synthetic_root), "--model", "resnet18", "--train-domain", "100",
                 "--img-size", "32", "--epochs", "1", "--out", str(run), "precision=32-true"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pid {process.pid}" in err
    assert sorted(path.name for path in run.iterdir()) == [RUN_LOCK]  # no config, status or metrics written


def test_the_lock_of_a_killed_process_is_taken_over(holder):
    run, process = holder
    assert writer_alive(run)  # another process writes the folder
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not writer_alive(run)  # a status.json saying "running" is now known to be stale
    with run_lock(run, "export"):  # the kernel dropped the dead process's lock
        assert f'"pid": {os.getpid()}' in (run / RUN_LOCK).read_text()


def test_the_lock_is_re_entrant_within_one_process_and_released_after(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with run_lock(run, "train"), run_lock(run, "evaluate"):  # train evaluates the run it holds
        pass
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from histotoken.engine.run_lock import run_lock\n"
         "with run_lock(sys.argv[1], 'export'): print('ok')", str(run)],
        capture_output=True, text=True, env={**os.environ, "HISTOTOKEN_DEFER_MODELS": "1"},
    )
    assert probe.stdout.strip() == "ok", probe.stderr


def test_an_export_into_a_run_being_written_is_refused(holder, tmp_path):
    from tests.run_fixture import make_run

    run, process = holder
    make_run(run, "resnet18", ("a", "b"), 32)
    from histotoken.engine.export import export_run

    with pytest.raises(RunFolderBusy, match=f"pid {process.pid}"):
        export_run(run, "onnx")
    assert not (run / "export" / "onnx" / "model.onnx").exists()
    assert process.poll() is None  # the holder goes on
