"""Export a trained run for use outside histotoken: ONNX, TorchScript, or a timm hub folder.

``export_run(run_dir, fmt)`` loads the run's best weights (token merging included when the run
was trained with it), writes the model to ``RUN_DIR/export/<format>/`` (or ``out_dir``) and checks
it: the exported model and the PyTorch model score the same batch (the run's test images, or
seeded random images when the data is absent) and the maximum absolute difference of the logits
must stay within ``tolerance``. A second, one-image batch checks that the batch axis is dynamic.
``out_dir`` may also name the model file itself (``model.onnx``; ``.pt``/``.ts`` for TorchScript).
The model is written under a temporary name, checked, and then renamed into place: an export that
fails the check, a full disk or a kill leaves the previous export (if any) whole and no torn file.

- ``onnx``: ``torch.onnx.export`` with the TorchScript-based exporter (``dynamo=False``) by default:
  on every family it exported in 1-3 s per tiny model, while the dynamo exporter took 6-57 s and
  specialised the batch axis of the token-merged ViT; ``onnx_exporter="dynamo"`` selects it.
  Checked in onnxruntime (CPU).
- ``torchscript``: ``torch.jit.script``, or ``torch.jit.trace`` where the model does not script
  (hooks, Python-side state); which one is recorded. Checked by loading the saved file.
- ``timm``: ``config.json`` + ``model.safetensors`` written by timm's own ``save_for_hf``; load it with
  ``timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay=dict(file=".../model.safetensors",
  num_classes=N), num_classes=N, **model_args)`` after ``import histotoken``, or with
  ``timm.create_model("local-dir:FOLDER", pretrained=True)``. Checked by loading it that way.

Every export writes ``export.json`` beside the model (docs/formats.md): class names, normalisation
(mean/std), input size, the run and checkpoint it came from, and the check's result.

An exporter error (an operator without an ONNX or TorchScript form) becomes an :class:`ExportError`
that names the operator (``aten::searchsorted``, ...), the format and the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import glob
import logging
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histotoken.formats import (
    EXPORT_FORMATS,
    EXPORT_MANIFEST,
    ONNX_FILE,
    TIMM_CONFIG_FILE,
    TIMM_WEIGHTS_FILE,
    TORCHSCRIPT_FILE,
    RunPaths,
)
from histotoken.io import atomic_write_json, read_json

logger = logging.getLogger(__name__)

FORMATS = EXPORT_FORMATS
ONNX_EXPORTERS = ("torchscript", "dynamo")
ONNX_OPSET = 17
DEFAULT_TOLERANCE = 1e-4  # max |logit difference| in fp32
EXAMPLE_BATCH = 2  # traced/exported at this batch size; checked at others

_OPERATOR_PATTERNS = (
    re.compile(r"\b((?:aten|prim|onnx|quantized|torchvision)::[A-Za-z_][A-Za-z0-9_.]*)"),
    re.compile(r"operator '?([A-Za-z_][A-Za-z0-9_.:]*)'?", re.IGNORECASE),
    re.compile(r"\bop(?:erator)? (?:type )?'?([A-Za-z_][A-Za-z0-9_.:]*)'? is not supported", re.IGNORECASE),
)


_ORT_NODE = re.compile(r"running (\w+) node\. Name:'([^']+)'")


class ExportError(ValueError):
    """A model could not be exported or the exported model does not reproduce PyTorch's logits."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """Where an export went and how well it matched PyTorch."""

    format: str
    out_dir: Path
    model_file: Path
    manifest: Path
    max_abs_diff: float
    check_images: int
    check_source: str  # "test images" or "random images"
    method: str  # exporter used (e.g. "torch.onnx.export(dynamo=False)", "torch.jit.trace")


@dataclasses.dataclass(frozen=True)
class ExportInfo:
    """What the export records about the model besides its weights."""

    model_name: str
    class_names: tuple[str, ...]
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: dict[str, Any] = dataclasses.field(default_factory=dict)  # run folder, checkpoint, task, ...


def operator_in_error(error: BaseException) -> str | None:
    """The operator an exporter error complains about (``aten::searchsorted``), or None."""
    text = "\n".join(str(part) for part in _error_chain(error))
    node = _ORT_NODE.search(text)  # onnxruntime: "... while running Concat node. Name:'/blocks/blocks.0/Concat_2' ..."
    if node:
        return f"onnx::{node.group(1)} (node {node.group(2)})"
    for pattern in _OPERATOR_PATTERNS:
        match = pattern.search(text)
        if match:
            return match.group(1)
    return None


def _error_chain(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return chain


def _export_failure(error: BaseException, fmt: str, model_name: str, method: str, running: bool = False) -> ExportError:
    operator = operator_in_error(error)
    first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    detail = f"({type(error).__name__}: {first_line[:300]})"
    if running:  # exported, but the exported model fails on the check batches (e.g. a batch axis fixed at export)
        where = f"at operator {operator}" if operator else ""
        return ExportError(
            f"the {fmt} export of {model_name} ({method}) cannot be loaded back or run on the check images "
            f"{where} {detail}; "
            "no file was kept. Try another --format, or report the operator so the model family can avoid it."
        )
    what = f"operator {operator} has no {fmt} form in {method}" if operator else f"{method} failed"
    return ExportError(
        f"{model_name} cannot be exported to {fmt}: {what} {detail}. "
        "Try another --format, or report the operator so the model family can avoid it."
    )


# --------------------------------------------------------------------------- exporters


def export_onnx(model: nn.Module, path: Path, example: torch.Tensor, exporter: str = "torchscript") -> str:
    """Write ``model`` as ONNX with a dynamic batch axis (input ``images``, output ``logits``)."""
    if exporter not in ONNX_EXPORTERS:
        raise ValueError(f"unknown ONNX exporter {exporter!r}; choose one of {', '.join(ONNX_EXPORTERS)}")
    options: dict[str, Any] = {"input_names": ["images"], "output_names": ["logits"]}
    if exporter == "dynamo":
        options.update(dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},))
    else:
        options.update(
            dynamo=False, opset_version=ONNX_OPSET, dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}
        )
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; the parity check is what counts
        torch.onnx.export(model, (example,), str(path), **options)
    return f"torch.onnx.export(dynamo={exporter == 'dynamo'}, opset {ONNX_OPSET if exporter != 'dynamo' else 'default'})"


def export_torchscript(model: nn.Module, path: Path, example: torch.Tensor) -> str:
    """Write ``model`` as TorchScript: scripted when it scripts, traced otherwise; returns which."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            compiled = torch.jit.script(model)
            method = "torch.jit.script"
        except Exception as error:  # noqa: BLE001  (any scripting failure: fall back to tracing)
            logger.info("%s does not script (%s); tracing it instead", type(model).__name__, str(error).split("\n")[0])
            with torch.no_grad():
                compiled = torch.jit.trace(model, example, check_trace=False)
            method = "torch.jit.trace"
        torch.jit.save(compiled, str(path))
    return method


def export_timm(model: nn.Module, out_dir: Path, info: ExportInfo) -> str:
    """Write timm's hub layout (config.json + model.safetensors) with our classes and normalisation."""
    from timm.models import save_for_hf

    size = int(info.img_size)
    save_for_hf(
        model,
        str(out_dir),
        model_config={"label_names": list(info.class_names)},
        model_args=_serialisable(info.model_kwargs),
        safe_serialization=True,
        data_config={"input_size": (3, size, size), "mean": tuple(info.mean), "std": tuple(info.std)},
    )
    return "timm.models.save_for_hf"


def _serialisable(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Model arguments that rebuild the architecture: histotoken's merge_r/merge_mode/merge_inflection (token merging
    is applied after creation) and donor-weight files dropped."""
    return {
        key: value for key, value in kwargs.items()
        if key not in ("merge_r", "merge_mode", "merge_inflection") and not key.endswith(("pretrained_file", "pretrained_donor"))
    }


# --------------------------------------------------------------------------- loading back


def run_exported(fmt: str, location: Path, images: torch.Tensor, info: ExportInfo) -> torch.Tensor:
    """Logits of an exported model for normalised float images (N, 3, S, S).

    ``location`` is the model file for ``onnx`` and ``torchscript``, the folder for ``timm``.
    """
    if fmt == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4  # failures come back as exceptions, reported by export_model
        session = onnxruntime.InferenceSession(str(location), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return torch.from_numpy(session.run(None, {name: images.numpy()})[0]).float()
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation note
            module = torch.jit.load(str(location), map_location="cpu").eval()
        with torch.no_grad():
            return module(images).float()
    model = load_timm_export(location)
    with torch.no_grad():
        return model(images).float()


def load_timm_export(out_dir: Path) -> nn.Module:
    """A timm folder written by :func:`export_timm`, loaded the documented way (histotoken imported)."""
    import json

    import timm

    import histotoken.models  # noqa: F401  (registers our families)

    config = json.loads((out_dir / TIMM_CONFIG_FILE).read_text())
    num_classes = int(config["num_classes"])
    model_args = {k: v for k, v in config.get("model_args", {}).items() if k != "num_classes"}
    model = timm.create_model(
        config["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out_dir / TIMM_WEIGHTS_FILE), num_classes=num_classes),
        num_classes=num_classes,
        **model_args,
    )
    return model.eval()


# --------------------------------------------------------------------------- export + check


# a name with one of these suffixes is the model file itself; any other name is a folder
FILE_SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".ts")}


@dataclasses.dataclass(frozen=True)
class ExportTarget:
    """Where an export goes: the folder, the model file (the folder itself for timm) and the manifest."""

    out_dir: Path
    model_file: Path
    manifest: Path


def export_target(fmt: str, out: str | Path) -> ExportTarget:
    """``out`` read as the model file when its suffix is the format's (``model.onnx``), else as a folder.

    In a folder the model gets its standard name (``model.onnx``, ``model.torchscript.pt``, timm's
    ``config.json`` + ``model.safetensors``) and the manifest is ``export.json``; beside a named file
    the manifest is named after it (``model.onnx`` -> ``model.export.json``).
    """
    out = Path(out)
    suffix = out.suffix.lower()
    for other, suffixes in FILE_SUFFIXES.items():
        if suffix in suffixes and other != fmt:
            hint = f"a name ending {' or '.join(FILE_SUFFIXES[fmt])}" if fmt in FILE_SUFFIXES else "a folder name"
            raise ValueError(f"--out {out} names a {other} file but the format is {fmt}; give --format {other}, or {hint}")
    if fmt == "timm" and suffix == ".safetensors":
        raise ValueError(f"--out {out}: a timm export is a folder (config.json + model.safetensors); give a folder name")
    if suffix in FILE_SUFFIXES.get(fmt, ()):
        return ExportTarget(out.parent, out, out.with_name(f"{out.stem}.{EXPORT_MANIFEST}"))
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; remove it or give another --out")
    model_file = {"onnx": out / ONNX_FILE, "torchscript": out / TORCHSCRIPT_FILE}.get(fmt, out / TIMM_WEIGHTS_FILE)
    return ExportTarget(out, model_file, out / EXPORT_MANIFEST)


def export_model(
    model: nn.Module,
    fmt: str,
    out: str | Path,
    info: ExportInfo,
    check_images: torch.Tensor,
    *,
    check_source: str = "random images",
    tolerance: float = DEFAULT_TOLERANCE,
    onnx_exporter: str = "torchscript",
) -> ExportResult:
    """Export ``model`` (eval mode, fp32, CPU) to ``out`` and check it against PyTorch.

    ``out`` is a folder, or the model file itself when its suffix is the format's (see
    :func:`export_target`). ``check_images`` are uint8 (N, 3, S, S) images at the model's input size;
    they are normalised with ``info.mean``/``info.std`` as the exported model expects its input.

    The model is written under a temporary name beside its target, checked there, and only then
    renamed into place, after the old manifest is removed: a failed check, a full disk or a kill at
    any moment leaves either the previous export whole or a model without a manifest, never a torn
    file beside a manifest that records a passed check.
    Raises :class:`ExportError` naming the operator when the exporter fails, and when the exported
    logits differ from PyTorch's by more than ``tolerance``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    target = export_target(fmt, out)
    if target.model_file.is_dir():
        raise ValueError(f"{target.model_file} is a folder; remove it or give another --out")
    target.out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target.out_dir, target.model_file.name)
    model = model.float().cpu().eval()
    images = normalise(check_images, info.mean, info.std)  # (N, 3, S, S) float32
    example = images[:EXAMPLE_BATCH] if len(images) >= EXAMPLE_BATCH else images.repeat(EXAMPLE_BATCH, 1, 1, 1)
    # the temporary: a file beside the model file, or (timm) a folder inside the target folder
    temporary = target.out_dir / f".{target.model_file.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    method = {"onnx": f"torch.onnx.export ({onnx_exporter} exporter)", "torchscript": "torch.jit",
              "timm": "timm save_for_hf"}[fmt]
    try:
        try:
            if fmt == "onnx":
                method = export_onnx(model, temporary, example, onnx_exporter)
            elif fmt == "torchscript":
                method = export_torchscript(model, temporary, example)
            else:
                temporary.mkdir()
                method = export_timm(model, temporary, info)
        except ExportError:
            raise
        except Exception as error:  # noqa: BLE001  (exporters raise many types; all become one clear error)
            raise _export_failure(error, fmt, info.model_name, method) from error

        try:
            with _without_token_merging(model) if fmt == "timm" else contextlib.nullcontext():
                max_diff = max(_max_abs_diff(model, fmt, temporary, batch, info) for batch in (images, images[:1]))
        except Exception as error:  # noqa: BLE001  (a model that exports but does not run is a failed export)
            raise _export_failure(error, fmt, info.model_name, method, running=True) from error
        if not max_diff <= tolerance:
            raise ExportError(
                f"the {fmt} export of {info.model_name} does not reproduce PyTorch: max |logit difference| "
                f"{max_diff:.3g} > tolerance {tolerance:g} on {len(images)} {check_source} (method {method}); "
                "nothing was written (a previous export there is unchanged). Report this model and format."
            )
        target.manifest.unlink(missing_ok=True)  # from here until the new manifest: a model without a manifest
        if fmt == "timm":
            for name in (TIMM_WEIGHTS_FILE, TIMM_CONFIG_FILE):
                os.replace(temporary / name, target.out_dir / name)
        else:
            os.replace(temporary, target.model_file)
    finally:
        _remove_path(temporary)
    atomic_write_json(
        target.manifest, _manifest(fmt, target.model_file, info, method, max_diff, tolerance, len(images), check_source)
    )
    logger.info("exported %s to %s (max |logit difference| %.2e)", info.model_name, target.model_file, max_diff)
    return ExportResult(fmt, target.out_dir, target.model_file, target.manifest, max_diff, len(images), check_source, method)


def _remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_stale_temporaries(folder: Path, name: str) -> None:
    """Temporaries of exports of ``name`` whose process died (``.NAME.PID.HEX.tmp``); a live process's are kept."""
    for path in folder.glob(f".{glob.escape(name)}.*.tmp"):
        parts = path.name.split(".")
        if len(parts) < 5 or not parts[-3].isdigit():
            continue
        pid = int(parts[-3])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            _remove_path(path)
        except OSError:
            continue  # alive, under another user


@contextlib.contextmanager
def _without_token_merging(model: nn.Module):
    """The plain model for a while: a timm folder holds weights only, token merging is applied on loading."""
    merge_r = int(getattr(model, "merge_r", 0) or 0)
    if not merge_r:
        yield model
        return
    from histotoken.models.token_merging import apply_token_merging, remove_token_merging

    remove_token_merging(model)
    try:
        yield model
    finally:
        apply_token_merging(model, merge_r)


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> float32 scaled to [0, 1] and normalised per channel."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


def _max_abs_diff(model: nn.Module, fmt: str, location: Path, images: torch.Tensor, info: ExportInfo) -> float:
    with torch.no_grad():
        expected = model(images).float()
    exported = run_exported(fmt, location, images, info)
    if exported.shape != expected.shape:
        raise ExportError(
            f"the {fmt} export of {info.model_name} gives logits of shape {tuple(exported.shape)} for a batch "
            f"of {len(images)}, PyTorch {tuple(expected.shape)}: its batch axis is not dynamic"
        )
    return float((exported - expected).abs().max())


def _manifest(
    fmt: str, model_file: Path, info: ExportInfo, method: str, max_diff: float, tolerance: float,
    n_images: int, source: str,
) -> dict[str, Any]:
    import timm

    size = int(info.img_size)
    return {
        "format": fmt,
        "file": model_file.name,
        "model_name": info.model_name,
        "model_kwargs": info.model_kwargs,
        "num_classes": len(info.class_names),
        "class_names": list(info.class_names),
        "input": {
            "name": "images",
            "shape": ["batch", 3, size, size],
            "dtype": "float32",
            "preprocessing": "RGB resized to img_size, scaled to [0, 1], then (x - mean) / std per channel",
        },
        "output": {"name": "logits", "shape": ["batch", len(info.class_names)], "dtype": "float32"},
        "img_size": size,
        "mean": list(info.mean),
        "std": list(info.std),
        "source": info.source,
        "token_merging": _merging_note(fmt, info),
        "exporter": method,
        "check": {"max_abs_diff": max_diff, "tolerance": tolerance, "images": n_images, "source": source},
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _merging_note(fmt: str, info: ExportInfo) -> dict[str, Any] | None:
    merge_r = int(info.source.get("merge_r", 0) or 0)
    if not merge_r:
        return None
    mode = str(info.source.get("merge_mode") or info.model_kwargs.get("merge_mode") or "tome")
    if fmt == "timm":
        return {
            "merge_r": merge_r, "merge_mode": mode, "in_file": False,
            "apply": f"histotoken.models.apply_token_merging(model, {merge_r}, mode={mode!r})",
        }
    return {"merge_r": merge_r, "merge_mode": mode, "in_file": True}


# --------------------------------------------------------------------------- a run folder


def export_run(
    run_dir: str | Path,
    fmt: str,
    out_dir: str | Path | None = None,
    *,
    check_batch: int = 8,
    tolerance: float = DEFAULT_TOLERANCE,
    onnx_exporter: str = "torchscript",
    seed: int = 0,
) -> ExportResult:
    """Export the best weights of ``run_dir`` to ``fmt`` (default folder RUN_DIR/export/<fmt>/).

    ``out_dir`` is a folder, or the model file itself when its suffix is the format's
    (``model.onnx``; ``.pt``/``.ts`` for TorchScript): see :func:`export_target`.
    """
    from histotoken.data.transforms import model_normalisation
    from histotoken.engine.evaluate import load_best_model

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    paths = RunPaths(Path(run_dir))
    if not paths.config.is_file():
        raise FileNotFoundError(f"{paths.root} is not a run folder (no config.yaml); give the --out folder of `histotoken train`")
    model, meta = load_best_model(paths.root)
    mean, std = model_normalisation(model)
    img_size = int(meta["img_size"])
    images, source = check_images_of_run(paths, img_size, check_batch, seed)
    info = ExportInfo(
        model_name=meta["model_name"],
        class_names=tuple(meta["class_names"]),
        img_size=img_size,
        mean=tuple(mean),
        std=tuple(std),
        model_kwargs=dict(meta.get("model_kwargs", {})),
        source={
            "run_dir": str(paths.root.resolve()),
            "checkpoint": str(paths.best_weights.relative_to(paths.root)),
            "task": meta.get("task"),
            "train_domain": meta.get("train_domain"),
            "best_epoch": meta.get("epoch"),
            "merge_r": meta.get("eval_merge_r", 0),
            "merge_mode": getattr(model, "merge_mode", None),
            "trained_precision": meta.get("precision"),
            # inputs must be stain-normalised like this before the exported model sees them
            "stain_normalisation": read_json(paths.stain).get("method") if paths.stain.is_file() else None,
        },
    )
    target = Path(out_dir) if out_dir is not None else paths.export_dir(fmt)
    from histotoken.engine.run_lock import run_lock

    inside_run = target.resolve().is_relative_to(paths.root.resolve())
    with run_lock(paths.root, "export") if inside_run else contextlib.nullcontext():  # one writer per run folder
        return export_model(
            model, fmt, target, info, images, check_source=source, tolerance=tolerance, onnx_exporter=onnx_exporter
        )


def check_images_of_run(paths: RunPaths, img_size: int, count: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """Up to ``count`` of the run's test images (uint8), or seeded random images when they are absent."""
    from histotoken.data.dataset import ImageStore
    from histotoken.data.splits import read_split

    try:
        split = read_split(paths.splits)
        test = split[split["split"] == "test"].head(count)
        if len(test):
            store = ImageStore.build(test, img_size)
            return store.images, "test images"
    except (FileNotFoundError, ValueError) as error:
        logger.warning("checking the export on random images: the run's test images are not readable (%s)", error)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, img_size, img_size), dtype=torch.uint8, generator=generator), "random images"
