"""Run configuration: a frozen dataclass; defaults <- YAML file <- command-line overrides.

The defaults are the training protocol of the magnification study we reproduce: AdamW
(lr 3e-4, weight decay 0.05), cosine schedule with warm-up, gradient clipping 1.0, mixed
precision where the hardware supports it, early stopping on validation macro-F1.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from histotoken.data.sources import source_names

TASKS = ("binary", "subtype", "classes")  # classes: the data's own classes (ImageFolder, CIFAR-10, tiles)
DATA_FORMATS = ("auto", *source_names())  # the data-source registry (histotoken.data.sources)
BALANCING = ("none", "class_weights", "sampler")
LOGGERS = ("none", "csv", "tensorboard", "mlflow", "wandb")
STAIN_NORMS = ("none", "macenko", "reinhard", "vahadane")  # see data/stain.py
STAIN_AUGMENTS = ("none", "hed")  # see data/transforms.py


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run (written to RUN_DIR/config.yaml)."""

    data: str = ""  # folder holding BreaKHis_v1 (or below it), an ImageFolder tree, CIFAR-10 binary or WSI tiles
    data_format: str = "auto"  # auto (detected from the folder), breakhis, imagefolder, cifar10, tiles
    groups: str | None = None  # ImageFolder: CSV image,group (patient) for grouped splits; default ROOT/groups.csv
    model: str = "resnet18"  # timm name, optionally NAME:key=value,...
    task: str = "binary"  # binary (benign/malignant) or subtype (8 classes)
    train_domain: str = "all"  # 40, 100, 200, 400, 100+400, all
    splits: str | None = None  # a frozen splits CSV; made from the data when absent
    split_scheme: str = "patient"  # patient (default) or image (leaks patients; warned)
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    folds: int | None = None
    fold: int = 0
    img_size: int = 224
    stain_norm: str = "none"  # none, macenko, reinhard (vahadane: not in torchstain yet): once, in the store
    stain_target: str | None = None  # the target H&E image of stain_norm (saved in the run folder)
    stain_augment: str = "none"  # none, hed (Tellez et al. 2018 HED jitter in training)
    epochs: int = 30
    stage_epochs: tuple[int, ...] | None = None  # for multi-stage models, e.g. (3, 12)
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.05  # not applied to norms, biases, position embeddings or class tokens
    layer_decay: float | None = None  # layer-wise lr decay for fine-tuning ViTs (e.g. 0.65), timm style
    warmup_epochs: int = 1
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    early_stopping_patience: int = 10
    balancing: str = "none"  # none, class_weights, sampler
    precision: str = "auto"  # auto, 32-true, bf16-mixed, 16-mixed
    accelerator: str = "auto"  # auto (a GPU when there is one), cpu, gpu
    devices: str = "auto"  # how many devices (e.g. 2), or auto
    strategy: str = "auto"  # Lightning strategy: auto, ddp (torchrun and SLURM are detected), ...
    num_nodes: int = 1
    num_workers: int = 0
    # last.ckpt at most this often (0: every epoch); an interruption or error still writes the last finished
    # epoch, so only a kill -9 can lose up to this much training
    checkpoint_interval_s: float = 60.0
    seed: int = 0
    pretrained: bool = False
    weights: str | None = None
    merge_r: int = 0
    bootstrap: int = 1000  # resamples of test patients for the 95% intervals (0: no intervals)
    logger: str = "none"  # extra experiment logger: none, csv, tensorboard, mlflow, wandb
    logger_uri: str | None = None  # mlflow tracking URI (default: a file store in the run folder)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}; got {self.task!r}")
        if self.data_format not in ("auto", *source_names()):  # sources registered at run time count too
            raise ValueError(f"data_format must be one of {('auto', *source_names())}; got {self.data_format!r}")
        if self.balancing not in BALANCING:
            raise ValueError(f"balancing must be one of {BALANCING}; got {self.balancing!r}")
        if self.stain_norm not in STAIN_NORMS:
            raise ValueError(f"stain_norm must be one of {STAIN_NORMS}; got {self.stain_norm!r}")
        if self.stain_augment not in STAIN_AUGMENTS:
            raise ValueError(f"stain_augment must be one of {STAIN_AUGMENTS}; got {self.stain_augment!r}")
        if self.stain_norm != "none" and not self.stain_target:
            raise ValueError(f"stain_norm={self.stain_norm} needs a target H&E image: give --stain-target IMAGE")
        if self.logger not in LOGGERS:
            raise ValueError(f"logger must be one of {LOGGERS}; got {self.logger!r}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], e.g. 0.65; got {self.layer_decay}")
        for name in ("img_size", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["stage_epochs"] is not None:
            data["stage_epochs"] = list(data["stage_epochs"])
        return data


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(cls: type, key: str, value: Any, source: str) -> Any:
    """Convert a YAML or command-line value to the field's type, with an error naming the source."""
    hint = _field_types(cls)[key]
    if value is None:
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    try:
        if typing.get_origin(base) is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(int(item) for item in items)
        if base is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if base in (int, float):
            return base(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {key}={value!r} is not a valid {getattr(base, '__name__', base)}") from None


def merge_config(cls: type, base: Any, values: Mapping[str, Any], source: str) -> Any:
    """Return ``base`` with ``values`` applied; unknown keys are an error naming the source."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {unknown}; known: {', '.join(sorted(known))}")
    changes = {key: _coerce(cls, key, value, source) for key, value in values.items()}
    return dataclasses.replace(base, **changes)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["epochs=5", "lr=1e-3"]`` -> ``{"epochs": 5, "lr": 0.001}`` (values read as YAML scalars)."""
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"cannot read override {item!r}; write key=value, e.g. epochs=5")
        result[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return result


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must be a mapping of setting: value")
    return data


def load_run_config(
    yaml_path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    base: RunConfig | None = None,
) -> RunConfig:
    """Defaults <- YAML file <- overrides (command-line flags and key=value pairs)."""
    config = base or RunConfig()
    if yaml_path is not None:
        config = merge_config(RunConfig, config, read_yaml(yaml_path), str(yaml_path))
    if overrides:
        config = merge_config(RunConfig, config, dict(overrides), "command line")
    return config


def write_run_config(config: RunConfig, path: Path) -> Path:
    from histotoken.io import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
