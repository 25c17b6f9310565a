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
