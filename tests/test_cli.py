import pytest

from histotoken.cli.main import COMMANDS, main


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert command in text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "Example" in text and f"histotoken {command}" in text


def test_index_and_split_commands_write_their_csv(synthetic_root, tmp_path, capsys):
    assert main(["index", str(synthetic_root), "--out", str(tmp_path / "index.csv")]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and "total" in out
    assert main(["split", str(synthetic_root), "--out", str(tmp_path / "split.csv"), "--seed", "3"]) == 0
    import pandas as pd

    split = pd.read_csv(tmp_path / "split.csv")
    assert set(split["split"]) == {"train", "val", "test"}
    assert split.groupby("patient_id")["split"].nunique().max() == 1


def test_train_and_evaluate_commands(synthetic_root, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--data", str(synthetic_root), "--model", "resnet18", "--train-domain", "100",
            "--img-size", "32", "--epochs", "1", "--out", str(run), "batch_size=16", "precision=32-true", "bootstrap=100"]
    assert main(args) == 0
    assert f"run folder: {run}" in capsys.readouterr().out
    assert main(args) == 0
    assert "already finished" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--domain", "400", "--bootstrap", "50"]) == 0
    assert (run / "eval" / "400.json").is_file()


def _modules_imported_by(arguments: list[str]) -> set[str]:
    """Top-level modules a fresh `histotoken ARGS` process imports (from -X importtime), and its exit code."""
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "histotoken.cli.main", *arguments],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: histotoken" in done.stdout
    return {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_imports_neither_torch_nor_timm(command):
    imported = _modules_imported_by(["--help"] if command is None else [command, "--help"])
    assert "histotoken.cli.common" in imported  # the measurement sees our imports
    assert not {"torch", "timm", "lightning"} & imported


def test_the_console_script_defers_model_registration_until_a_command_needs_it(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "histotoken"
    if not script.is_file():
        pytest.skip("the histotoken console script is not installed in this environment")
    done = subprocess.run([sys.executable, "-X", "importtime", str(script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "torch" not in {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
                                                     if line.startswith("import time:")}
    # a library user still gets the families registered by `import histotoken`
    probe = "import histotoken, timm; print('tokenlearner_vit_tiny' in timm.list_models('tokenlearner_vit_*'))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "True"


def test_lightning_banners_print_at_most_once_per_command(synthetic_root, tmp_path):
    import os
    import subprocess
    import sys

    from tests.run_fixture import write_image

    def histotoken(*arguments: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "histotoken.cli.main", *arguments], capture_output=True, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    run = tmp_path / "run"
    # training builds two Trainers (fit, then the evaluation); with -v each banner shows once
    trained = histotoken("-v", "train", "--data", str(synthetic_root), "--model", "resnet18", "--train-domain", "100",
                         "--img-size", "32", "--epochs", "1", "--out", str(run), "batch_size=16", "precision=32-true",
                         "bootstrap=0")
    assert trained.count("GPU available:") == 1 and trained.count("TPU available:") == 1
    images = [str(write_image(tmp_path / "images" / f"{i}.png", seed=i)) for i in range(2)]
    # test-time augmentation used to build one Trainer per view (8 banners)
    verbose = histotoken("-v", "predict", str(run), *images, "--tta", "--out", str(tmp_path / "p.csv"))
    assert verbose.count("GPU available:") == 1
    quiet = histotoken("predict", str(run), *images, "--tta", "--out", str(tmp_path / "q.csv"))
    assert "GPU available:" not in quiet and "TPU available:" not in quiet  # Lightning's chatter only with -v


def test_a_file_where_the_output_folder_should_be_is_one_line_naming_it(synthetic_root, tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a folder")
    assert main(["split", str(synthetic_root), "--out", str(blocker / "split.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(blocker) in err and "a file is in the way" in err


@pytest.mark.parametrize(("code", "fix"), [("EROFS", "read-only"), ("ENOSPC", "disk is full"), ("EACCES", "permission")])
def test_a_read_only_or_full_disk_is_one_line_naming_the_path_and_the_fix(code, fix, synthetic_root, tmp_path, capsys,
                                                                          monkeypatch):
    import errno
    import os

    import histotoken.io

    def refused(path, data):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), str(path))

    monkeypatch.setattr(histotoken.io, "atomic_write_bytes", refused)  # root ignores chmod; a real tmpfs needs root
    out = tmp_path / "split.csv"
    assert main(["split", str(synthetic_root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and fix in err


def test_accelerator_gpu_without_a_gpu_is_one_line(synthetic_root, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code = main(["train", "--data", str(synthetic_root), "--model", "resnet18", "--train-domain", "100", "--img-size",
                 "32", "--epochs", "1", "--accelerator", "gpu", "--out", str(tmp_path / "run"), "precision=32-true"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--accelerator" in err and "Traceback" not in err
    import json

    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"  # never left "running"


@pytest.mark.parametrize("command", ["evaluate", "tile", "predict", "train"])
def test_the_message_after_sigterm_fits_the_command(command, tmp_path, capsys, monkeypatch):
    import importlib
    import signal

    from histotoken.engine.interrupt import RunInterrupted

    def terminated(args):
        raise RunInterrupted(signal.SIGTERM)

    monkeypatch.setattr(importlib.import_module(f"histotoken.cli.{command}"), "run", terminated)
    arguments = {
        "evaluate": ["evaluate", str(tmp_path), "--domain", "100"],
        "tile": ["tile", str(tmp_path), "--out", str(tmp_path / "tiles")],
        "predict": ["predict", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "p.csv")],
        "train": ["train", "--data", str(tmp_path), "--model", "resnet18", "--out", str(tmp_path / "run")],
    }[command]
    assert main(arguments) == 143
    err = capsys.readouterr().err
    assert "SIGTERM" in err and "re-run the same command" in err.lower()
    assert ("finished epochs are saved" in err) == (command == "train")  # only training has epochs to keep
