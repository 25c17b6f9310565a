import pytest

from histotoken.config import RunConfig, load_run_config, parse_overrides


def test_yaml_overrides_defaults_and_command_line_overrides_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 7\nlr: 0.001\nmodel: resnet18\n")
    config = load_run_config(path, parse_overrides(["lr=5e-4", "stage_epochs=2,3"]))
    assert config.epochs == 7  # from YAML
    assert config.lr == 5e-4  # command line wins over YAML
    assert config.weight_decay == RunConfig().weight_decay  # default
    assert config.stage_epochs == (2, 3)


def test_unknown_settings_name_the_source(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epoch: 7\n")
    with pytest.raises(ValueError, match="run.yaml.*unknown setting"):
        load_run_config(path)
    with pytest.raises(ValueError, match="command line.*unknown setting"):
        load_run_config(None, {"learning_rate": 1})


def test_wrongly_typed_values_are_refused():
    with pytest.raises(ValueError, match="epochs='many'"):
        load_run_config(None, {"epochs": "many"})
    with pytest.raises(ValueError, match="task"):
        load_run_config(None, {"task": "grading"})


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        RunConfig().epochs = 3
