"""Study specification (YAML) and its expansion into runs.

A spec names the data, tasks, models (timm names with kwargs), train and test domains, seeds
or folds, the shared training protocol and the efficiency-benchmark settings::

    name: magnification_study
    data: /data/BreaKHis            # or --data on the command line
    tasks: [subtype]
    models:
      - deit_small_patch16_224
      - {name: cnnprune_vit_small, kwargs: {keep_ratio: 0.5}}
      - deit_small_patch16_224:merge_r=13
    train_domains: ["100", "400", "100+400"]
    test_domains: ["100", "400", "100+400"]
    seeds: [0]                      # or  folds: 5
    split: {scheme: patient, val: 0.15, test: 0.15}
    protocol: {img_size: 224, epochs: 100, batch_size: 32, pretrained: true}
    efficiency: {batch_size: 32, rounds: 5}
    factors: {stain_norm: [none, macenko]}   # other settings to cross with the grid (see expand)
    probes: [none, linear]          # frozen-feature probes (linear, knn, mlp) as a factor; none = fine-tune
    reference_model: deit_small_patch16_224   # paired differences in the report (default: the first model)
    launcher: {partition: gpu, gpus_per_task: 1, timeout_min: 720, mem_gb: 32, cpus_per_task: 8}

``launcher`` holds the settings of ``histotoken grid --launcher slurm`` (see
:mod:`histotoken.experiments.launch`); flags on the command line override them.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path
from typing import Any

import yaml

from histotoken.config import RunConfig, merge_config, read_yaml
from histotoken.data.domains import domain_name
from histotoken.models.factory import ModelSpec, parse_model_spec

SPEC_KEYS = {
    "name", "description", "data", "tasks", "models", "train_domains", "test_domains",
    "seeds", "folds", "split", "protocol", "efficiency", "reference_model", "launcher",
    "synthetic",  # used by `histotoken demo` to make its data set; ignored by `grid`
    "factors",  # run settings crossed with the grid, e.g. {stain_norm: [none, macenko]}
    "data_format", "groups",  # kind of data folder (default auto) and an ImageFolder's image -> group CSV
    "explain",  # explanations of every run after its evaluation (histotoken.explain.run.EXPLAIN_SPEC_KEYS)
    "probes",  # probes on frozen features crossed with the grid: linear, knn, mlp, or none (= fine-tune)
}
FINE_TUNE = "none"  # the ``probes:`` value that means fine-tuning the whole model
# Protocol keys the grid sets itself, per run.
PER_RUN_KEYS = {"data", "model", "task", "train_domain", "splits", "seed", "fold", "folds", "data_format", "groups"}


@dataclasses.dataclass(frozen=True)
class StudySpec:
    name: str
    data: str
    tasks: tuple[str, ...]
    models: tuple[ModelSpec, ...]
    train_domains: tuple[str, ...]
    test_domains: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    folds: int | None = None
    split: dict[str, Any] = dataclasses.field(default_factory=dict)
    protocol: dict[str, Any] = dataclasses.field(default_factory=dict)
    efficiency: dict[str, Any] = dataclasses.field(default_factory=dict)
    description: str = ""
    factors: dict[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)  # setting -> values
    reference_model: str | None = None
    launcher: dict[str, Any] = dataclasses.field(default_factory=dict)
    data_format: str = "auto"  # auto, breakhis, imagefolder, cifar10, tiles
    groups: str | None = None  # ImageFolder: CSV image,group
    explain: dict[str, Any] = dataclasses.field(default_factory=dict)  # empty: no explanations
    probes: tuple[str, ...] = ()  # empty: fine-tune only, and run ids without a probe part

    @property
    def reference(self) -> str:
        """Label of the model every other model is compared with (default: the first one)."""
        return self.reference_model or self.models[0].label

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "data": self.data,
            "data_format": self.data_format,
            "groups": self.groups,
            "tasks": list(self.tasks),
            "models": [m.to_dict() for m in self.models],
            "train_domains": list(self.train_domains),
            "test_domains": list(self.test_domains),
            "seeds": list(self.seeds),
            "folds": self.folds,
            "split": dict(self.split),
            "protocol": dict(self.protocol),
            "efficiency": dict(self.efficiency),
            "factors": {key: list(values) for key, values in self.factors.items()},
            "reference_model": self.reference_model,
            "launcher": dict(self.launcher),
            **({"explain": _explain_entry(self.explain)} if self.explain else {}),
            **({"probes": list(self.probes)} if self.probes else {}),
        }

    def base_config(self) -> RunConfig:
        """The shared protocol as a RunConfig (per-run fields are filled in by ``expand``)."""
        split = {"scheme": "split_scheme", "val": "val_fraction", "test": "test_fraction"}
        values = {split[k]: v for k, v in self.split.items()}
        return merge_config(RunConfig, RunConfig(), {**self.protocol, **values}, "study protocol")


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    run_id: str
    model: ModelSpec
    task: str
    train_domain: str
    seed: int
    fold: int | None
    split_name: str  # seed<N> or fold<I>
    settings: tuple[tuple[str, Any], ...] = ()  # this run's values of the spec's factors
    probe: str | None = None  # linear, knn or mlp: a probe on frozen features (features.probe); None: fine-tune

    def label(self, spec: StudySpec) -> str:
        """The model label in study tables, with the probe and the factors that vary:
        ``resnet18 [probe=linear]``, ``resnet18 [stain_norm=macenko]``.

        Runs that differ only by a factor are different arms of the study, so every table that groups
        by model keeps them apart. (Efficiency is a property of the model alone: ``model_label``.)
        """
        varying = [(key, value) for key, value in self.settings if len(spec.factors.get(key, ())) > 1]
        if self.probe:
            varying.insert(0, ("probe", self.probe))
        if not varying:
            return self.model.label
        return f"{self.model.label} [{', '.join(f'{key}={value}' for key, value in varying)}]"

    def config(self, spec: StudySpec, splits_csv: Path) -> RunConfig:
        base = spec.base_config()
        if self.settings:
            base = merge_config(RunConfig, base, dict(self.settings), f"factors of run {self.run_id}")
        return dataclasses.replace(
            base,
            data=spec.data,
            data_format=spec.data_format,
            groups=spec.groups,
            model=_model_text(self.model),
            task=self.task,
            train_domain=self.train_domain,
            splits=str(splits_csv),
            seed=self.seed,
        )


def model_label(label: str) -> str:
    """The model part of a study-table label: ``resnet18 [stain_norm=macenko]`` -> ``resnet18``."""
    return label.split(" [", 1)[0]


def _model_text(model: ModelSpec) -> str:
    if not model.kwargs:
        return model.name
    return model.name + ":" + ",".join(f"{k}={v}" for k, v in model.kwargs)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")


def load_spec(path: str | Path, data: str | None = None, data_format: str | None = None) -> StudySpec:
    """Read and check a study file; ``data`` and ``data_format`` (from --data, --data-format) override the file's."""
    raw = read_yaml(path)
    return spec_from_dict(raw, str(path), data, data_format)


def spec_from_dict(
    raw: dict[str, Any], source: str, data: str | None = None, data_format: str | None = None
) -> StudySpec:
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}; known: {', '.join(sorted(SPEC_KEYS))}")
    for key in ("models", "train_domains"):
        if not raw.get(key):
            raise ValueError(f"{source}: '{key}' must list at least one entry")
    data_root = data or raw.get("data")
    if not data_root:
        raise ValueError(f"{source}: no data root; set 'data:' in the file or pass --data DATA_ROOT")
    protocol = dict(raw.get("protocol") or {})
    clash = sorted(set(protocol) & PER_RUN_KEYS)
    if clash:
        raise ValueError(f"{source}: protocol must not set {clash}; the grid sets them per run")
    tasks = tuple(raw.get("tasks") or ["subtype"])
    train_domains = tuple(domain_name(str(d)) for d in raw["train_domains"])
    test_domains = tuple(domain_name(str(d)) for d in (raw.get("test_domains") or raw["train_domains"]))
    seeds = tuple(int(s) for s in (raw.get("seeds") or [0]))
    spec = StudySpec(
        name=str(raw.get("name") or Path(source).stem),
        description=str(raw.get("description") or ""),
        data=str(Path(data_root).expanduser().resolve()),
        tasks=tasks,
        models=tuple(parse_model_spec(m) for m in raw["models"]),
        train_domains=train_domains,
        test_domains=test_domains,
        seeds=seeds,
        folds=raw.get("folds"),
        split=dict(raw.get("split") or {}),
        protocol=protocol,
        efficiency=dict(raw.get("efficiency") or {}),
        factors=_factors(raw.get("factors"), protocol, source),
        probes=_probes(raw.get("probes"), source),
        reference_model=_reference_label(raw.get("reference_model"), source),
        launcher=dict(raw.get("launcher") or {}),
        data_format=str(data_format or raw.get("data_format") or "auto"),
        groups=str(Path(raw["groups"]).expanduser().resolve()) if raw.get("groups") else None,
        explain=_explain_settings(raw.get("explain"), source),
    )
    merge_config(RunConfig, RunConfig(), {"data_format": spec.data_format}, source)  # a known kind
    spec.base_config()  # validates protocol values and task names early, naming the file
    for settings in _factor_levels(spec):
        try:
            merge_config(RunConfig, spec.base_config(), dict(settings), f"{source}: factors")
        except ValueError as error:
            message = str(error) if source in str(error) else f"{source}: factors {dict(settings)}: {error}"
            raise ValueError(message) from None
    for task in tasks:
        merge_config(RunConfig, RunConfig(), {"task": task}, source)
    labels = [m.label for m in spec.models]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{source}: a model is listed twice: {labels}")
    if spec.reference_model is not None and spec.reference_model not in labels:
        raise ValueError(f"{source}: reference_model {spec.reference_model!r} is none of the models {labels}")
    from histotoken.experiments.launch import launcher_settings

    launcher_settings(spec.launcher, {}, source)  # unknown launcher keys fail here, naming the file
    return spec


def _explain_settings(value: Any, source: str) -> dict[str, Any]:
    """``explain:`` as keyword arguments of explain_run: ``true`` (defaults) or a mapping of known keys."""
    if value is None or value is False:
        return {}
    if value is True:
        return {"enabled": True}
    from histotoken.explain.run import EXPLAIN_SPEC_KEYS

    if not isinstance(value, dict):
        raise ValueError(f"{source}: explain must be true or a mapping of {', '.join(EXPLAIN_SPEC_KEYS)}")
    value = dict(value)
    enabled = value.pop("enabled", True)  # spec.yaml files written by earlier versions kept this marker
    unknown = sorted(set(value) - set(EXPLAIN_SPEC_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown explain keys {unknown}; known: {', '.join(EXPLAIN_SPEC_KEYS)}")
    return {"enabled": True, **value} if enabled else {}


def _explain_entry(settings: dict[str, Any]) -> bool | dict[str, Any]:
    """``explain:`` as a spec file writes it, so that ``_explain_settings`` reads it back to ``settings``."""
    written = {key: value for key, value in settings.items() if key != "enabled"}
    return written or True


def _reference_label(value: Any, source: str) -> str | None:
    """``reference_model:`` as a model label (it may be written like a models entry)."""
    if value is None:
        return None
    try:
        return parse_model_spec(value).label
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: reference_model: {error}") from None


def _factors(raw: Any, protocol: dict[str, Any], source: str) -> dict[str, tuple[Any, ...]]:
    """``factors:`` as {RunConfig setting: values} (``spec_from_dict`` checks every combination)."""
    if not raw:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: 'factors' must map settings to lists of values, e.g. {{stain_norm: [none, macenko]}}")
    factors = {}
    for key, values in raw.items():
        if key in PER_RUN_KEYS or key in protocol:
            where = "the grid sets it per run" if key in PER_RUN_KEYS else "protocol sets it too"
            raise ValueError(f"{source}: factor {key!r} cannot vary: {where}")
        if not isinstance(values, list) or not values:
            raise ValueError(f"{source}: factor {key!r} must list at least one value, e.g. {key}: [a, b]")
        if len({str(v) for v in values}) != len(values):
            raise ValueError(f"{source}: factor {key!r} lists a value twice: {values}")
        factors[str(key)] = tuple(values)
    return factors


def _probes(raw: Any, source: str) -> tuple[str, ...]:
    """``probes:`` as a tuple of probe kinds and ``none`` (fine-tuning), in the spec's order."""
    from histotoken.features.probe import PROBES

    if raw is None:
        return ()
    values = [raw] if isinstance(raw, str) else raw
    known = (FINE_TUNE, *PROBES)
    if not isinstance(values, list) or not values:
        raise ValueError(f"{source}: 'probes' must list at least one of {', '.join(known)}, e.g. probes: [none, linear]")
    probes = tuple("none" if value is None or value is False else str(value).lower() for value in values)
    unknown = [value for value in probes if value not in known]
    if unknown:
        raise ValueError(f"{source}: unknown probe(s) {unknown} in 'probes'; choose from {', '.join(known)} "
                         "(none = fine-tune the whole model)")
    if len(set(probes)) != len(probes):
        raise ValueError(f"{source}: 'probes' lists a value twice: {list(probes)}")
    return probes


def _probe_levels(spec: StudySpec) -> list[tuple[str | None, str]]:
    """(probe or None for fine-tuning, run-id part) for each value of ``probes:`` (fine-tuning alone without it)."""
    if not spec.probes:
        return [(None, "")]
    return [(None, "__finetune") if probe == FINE_TUNE else (probe, f"__probe-{probe}") for probe in spec.probes]


def _factor_levels(spec: StudySpec) -> list[tuple[tuple[str, Any], ...]]:
    """Every combination of the factors' values, in the order the spec lists them."""
    keys = list(spec.factors)
    return [tuple(zip(keys, values)) for values in itertools.product(*(spec.factors[k] for k in keys))]


def _factor_suffix(settings: tuple[tuple[str, Any], ...], spec: StudySpec) -> str:
    """``__stain_norm-macenko`` for each factor with more than one value (run ids name what varies)."""
    return "".join(f"__{key}-{value}" for key, value in settings if len(spec.factors[key]) > 1)


def expand(spec: StudySpec) -> list[PlannedRun]:
    """Every (model, task, train domain, probe, factor values, seed or fold) combination, in a stable order."""
    if spec.folds:
        partitions = [(spec.seeds[0], fold, f"fold{fold}") for fold in range(int(spec.folds))]
    else:
        partitions = [(seed, None, f"seed{seed}") for seed in spec.seeds]
    runs = []
    for seed, fold, split_name in partitions:
        for task in spec.tasks:
            for model in spec.models:
                for domain in spec.train_domains:
                    for probe, probe_part in _probe_levels(spec):
                        for settings in _factor_levels(spec):
                            suffix = probe_part + _factor_suffix(settings, spec)
                            run_id = safe_name(f"{model.label}__{task}__train{domain}{suffix}__{split_name}")
                            runs.append(PlannedRun(run_id, model, task, domain, seed, fold, split_name, settings,
                                                   probe))
    return runs


def dump_spec(spec: StudySpec) -> str:
    return yaml.safe_dump(spec.to_dict(), sort_keys=False)
