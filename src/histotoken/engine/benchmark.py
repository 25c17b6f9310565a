"""Measure what models cost at inference: parameters, FLOPs, tokens, latency, throughput, memory.

All models of one call are built first and then measured side by side in one process,
interleaved: every round visits every model once (round-robin) and each figure is the median
over rounds, so that slow drift of the machine (turbo clocks, other tenants, thermal state)
hits every model alike. Same-measurement medians still vary 10-20% between separate runs on
shared CPUs; compare models within one table, not across tables.

What each figure means and how it is measured:

- ``params_m``: trainable and frozen parameters, in millions (``sum(p.numel())``).
- ``gflops``: forward floating-point operations for one image, in billions, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` at batch 1 in fp32 without autocast. One
  multiply-add counts as 2 FLOPs (DeiT-S at 224 px: about 9.2); papers that count
  multiply-adds ("MACs", e.g. fvcore) report half of this. Only matrix products,
  convolutions and attention are counted (attention on PyTorch's math kernel, so that the
  count does not depend on which fused kernel a machine runs); element-wise work (norms,
  activations) is not.
- ``tokens_per_block``: tokens each transformer block processed in that same forward pass,
  class token included, read from the input shape of every block with forward hooks, for our
  families and for timm ViTs, Mixers and Swin alike (for a plain ViT:
  ``num_prefix_tokens + patch_embed.num_patches`` per block). Empty
  for CNNs. ``tokens_final`` is the number of tokens leaving the last block, i.e. entering
  the classifier head's pooling (empty for CNNs).
- ``latency_ms_median`` / ``latency_ms_p90``: wall-clock time of single forward passes at
  batch 1 (one image at a time: the interactive or slide-viewer case). Each round gives a
  median and a 90th percentile of its passes; the medians of those over rounds are reported,
  so that one disturbed round does not move either figure.
- ``throughput_img_s``: images per second at ``batch_size`` (the batch-scoring case, e.g.
  all patches of a slide); one value per round, the median reported.
- ``peak_memory_mb``: this model's weights (parameters and buffers) plus the largest growth
  of memory during one forward pass at ``batch_size`` (activations, the input batch,
  autocast's low-precision weight copies, workspaces). On CUDA the growth is
  ``torch.cuda.max_memory_allocated`` minus the memory allocated just before the pass. On CPU
  it is the peak resident set size (RSS) of the process, sampled every millisecond by a
  background thread with ``psutil``, minus the RSS just before the pass (taken after garbage
  collection and, on glibc, ``malloc_trim`` so that memory freed by earlier passes does not
  hide this one). That pass is an extra, untimed copy of the throughput pass, so the sampling
  thread never competes with timed work.
- ``throughput_ratio``: ``throughput_img_s`` divided by the first model's.

Timed passes run inside ``torch.inference_mode()`` and the autocast context of the resolved
precision (``histotoken.engine.precision``); conv nets run in ``channels_last`` memory format.
Each model gets warm-up passes at both batch sizes before any timing, and one untimed pass at
the start of every round (to refill caches evicted by the previous model).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import gc
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histotoken.engine.precision import autocast_context, resolve_precision
from histotoken.models.factory import ModelSpec, check_model_name, create_model, parse_model_spec

logger = logging.getLogger(__name__)

ROW_FIELDS = (
    "model",
    "model_name",
    "model_kwargs",
    "img_size",
    "batch_size",
    "precision",
    "device",
    "params_m",
    "gflops",
    "tokens_per_block",
    "tokens_final",
    "latency_ms_median",
    "latency_ms_p90",
    "throughput_img_s",
    "peak_memory_mb",
    "throughput_ratio",
)
"""Columns of a benchmark table, in order (docs/formats.md, "Benchmark")."""

ProgressCallback = Callable[[int, int, str], None]
"""Called as ``progress(steps_done, steps_total, message)`` after each step of the benchmark."""


@dataclasses.dataclass
class _Candidate:
    """One model under measurement and what has been measured so far."""

    spec: ModelSpec
    model: nn.Module
    single_image: torch.Tensor  # (1, 3, H, W)
    batch: torch.Tensor  # (batch_size, 3, H, W)
    params_m: float = 0.0
    weight_bytes: int = 0
    gflops: float = 0.0
    tokens_per_block: list[int] = dataclasses.field(default_factory=list)
    tokens_final: int | None = None
    peak_memory_bytes: int = 0
    latency_medians_s: list[float] = dataclasses.field(default_factory=list)  # one per round
    latency_p90s_s: list[float] = dataclasses.field(default_factory=list)  # one per round
    throughputs: list[float] = dataclasses.field(default_factory=list)


def benchmark_models(
    specs: Sequence[str | ModelSpec],
    img_size: int = 224,
    batch_size: int = 32,
    precision: str = "auto",
    merge_r: int = 0,
    num_classes: int = 8,
    rounds: int = 5,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    *,
    warmup_iters: int = 2,
    latency_iters: int = 10,
    throughput_iters: int = 3,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Measure every model of ``specs`` side by side; return one row per model (see ``ROW_FIELDS``).

    ``specs`` are model specs (``NAME`` or ``NAME:key=value,...``); the first is the reference of
    ``throughput_ratio``. ``merge_r`` > 0 applies token merging to every model whose spec does not
    set its own ``merge_r`` (ViT/DeiT only). The figures and their methods are described in the
    module docstring. ``latency_iters`` batch-1 passes and ``throughput_iters`` passes at
    ``batch_size`` are timed per model per round, after ``warmup_iters`` warm-up passes of each.

    Rows hold native values: ``model_kwargs`` a dict, ``tokens_per_block`` a list of ints,
    ``tokens_final`` an int or None; ``write_benchmark`` turns them into JSON text for the CSV.
    """
    if not specs:
        raise ValueError("benchmark needs at least one model; pass --model NAME (e.g. --model resnet18)")
    for name, value in (("rounds", rounds), ("batch_size", batch_size), ("img_size", img_size),
                        ("latency_iters", latency_iters), ("throughput_iters", throughput_iters)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1; got {value}")
    torch_device = _check_device(device)
    resolved_precision = resolve_precision(precision, torch_device.type, img_size)
    parsed = [_with_merge_r(parse_model_spec(spec), merge_r) for spec in specs]
    for spec in parsed:  # a typo in the last name should fail now, not after building the others
        check_model_name(spec.name)
    total_steps = len(parsed) * (rounds + 1)
    steps_done = 0

    def report(message: str) -> None:
        nonlocal steps_done
        steps_done += 1
        logger.debug("[%d/%d] %s", steps_done, total_steps, message)
        if progress is not None:
            progress(steps_done, total_steps, message)

    logger.info(
        "benchmarking %d models at %d px, batch %d, %s on %s, %d rounds",
        len(parsed), img_size, batch_size, resolved_precision, torch_device, rounds,
    )
    _warn_if_busy(torch_device)
    candidates = []
    for spec in parsed:
        candidate = _prepare(spec, num_classes, img_size, batch_size, torch_device, seed)
        _warm_up(candidate, resolved_precision, warmup_iters)
        candidate.peak_memory_bytes = candidate.weight_bytes + _forward_memory_growth(candidate, resolved_precision)
        candidates.append(candidate)
        report(f"prepared {spec.label}")

    for round_index in range(rounds):
        started = time.perf_counter()
        for candidate in candidates:
            _measure_round(candidate, resolved_precision, latency_iters, throughput_iters)
            report(f"round {round_index + 1}/{rounds}: {candidate.spec.label}")
        logger.info("round %d/%d done in %.0f s", round_index + 1, rounds, time.perf_counter() - started)

    reference = statistics.median(candidates[0].throughputs)
    return [_to_row(c, img_size, batch_size, resolved_precision, torch_device, reference) for c in candidates]


def _check_device(device: str) -> torch.device:
    try:
        torch_device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r}; use cpu or cuda") from error
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "CUDA was requested but torch.cuda.is_available() is False on this machine; use --device cpu"
        )
    if torch_device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu or cuda")
    return torch_device


def cpu_busy_percent(interval_s: float = 0.25) -> float:
    """System-wide CPU use (percent of all cores) over ``interval_s``: other work, when we are idle."""
    import psutil

    return float(psutil.cpu_percent(interval=interval_s))


def _warn_if_busy(device: torch.device) -> None:
    """CPU timings share the cores with whatever else runs; say so when that is a lot."""
    if device.type != "cpu":
        return
    busy = cpu_busy_percent()
    if busy > 25:
        logger.warning(
            "other work is using %.0f%% of this machine's CPU: it slows the models unevenly and makes "
            "latency and throughput unreliable; run on an idle machine", busy,
        )


def _with_merge_r(spec: ModelSpec, merge_r: int) -> ModelSpec:
    """Fold a global ``merge_r`` into the spec so label and ``model_kwargs`` show it."""
    if not merge_r or "merge_r" in spec.kwargs_dict:
        return spec
    return ModelSpec(spec.name, tuple(sorted({**spec.kwargs_dict, "merge_r": int(merge_r)}.items())))


def is_conv_net(model: nn.Module) -> bool:
    """True for models with convolutions beyond a single patch-embedding layer (CNNs, ConvMixer, hybrids).

    Those get ``channels_last`` memory format, which speeds conv layers up 1.2-2x on CPU; a ViT's
    lone patchify convolution gains nothing from it.
    """
    return sum(isinstance(module, nn.Conv2d) for module in model.modules()) > 1


def _prepare(
    spec: ModelSpec, num_classes: int, img_size: int, batch_size: int, device: torch.device, seed: int
) -> _Candidate:
    logger.info("building %s", spec.label)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(spec, num_classes=num_classes, img_size=img_size)
        generator = torch.Generator().manual_seed(seed)
        single_image = torch.randn(1, 3, img_size, img_size, generator=generator)
        batch = torch.randn(batch_size, 3, img_size, img_size, generator=generator)
    memory_format = torch.channels_last if is_conv_net(model) else torch.contiguous_format
    model = model.eval().to(device=device, memory_format=memory_format)
    candidate = _Candidate(
        spec=spec,
        model=model,
        single_image=single_image.to(device=device, memory_format=memory_format),
        batch=batch.to(device=device, memory_format=memory_format),
    )
    candidate.params_m = sum(p.numel() for p in model.parameters()) / 1e6
    candidate.weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    candidate.gflops, candidate.tokens_per_block, candidate.tokens_final = count_flops_and_tokens(
        model, candidate.single_image
    )
    return candidate


def count_flops_and_tokens(model: nn.Module, sample: torch.Tensor) -> tuple[float, list[int], int | None]:
    """One fp32 forward pass of ``sample`` (batch 1): GFLOPs per image, tokens per block, final tokens.

    Token counts come from forward hooks on the model's blocks (``model.blocks``, or
    ``model.layers[i].blocks`` for Swin); forward itself records nothing (as in
    :func:`histotoken.models.records.record_tokens`).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # The fused attention kernels are not counted by FlopCounterMode on every torch build and CPU
    # (DeiT-S read 8.48 instead of 9.20 GFLOPs where the CPU flash kernel ran): counting on the
    # math backend sees attention as the matrix products it is, on every machine.
    with (
        _TokenProbe(model) as probe, torch.inference_mode(), sdpa_kernel(SDPBackend.MATH),
        FlopCounterMode(display=False) as counter,
    ):
        model(sample)
    gflops = counter.get_total_flops() / sample.shape[0] / 1e9
    return gflops, probe.tokens_in, probe.tokens_out


class _TokenProbe:
    """Forward hooks that record the token count entering each block and leaving the last one.

    Blocks are ``model.blocks`` (ViT, DeiT, Mixer: inputs ``(B, N, C)``) or the ``blocks`` of each
    stage in ``model.layers`` (Swin: inputs ``(B, H, W, C)``, N = H * W). A 4-D input in
    ``model.blocks`` is a conv feature map (ConvMixer) and counts as no tokens.
    """

    def __init__(self, model: nn.Module) -> None:
        self.blocks, self.spatial_tokens = _token_blocks(model)
        self.tokens_in: list[int] = []
        self.tokens_out: int | None = None
        self._handles: list[Any] = []

    def _count(self, tensor: Any) -> int | None:
        if not isinstance(tensor, torch.Tensor):
            return None
        if tensor.ndim == 3:  # (B, N, C)
            return int(tensor.shape[1])
        if tensor.ndim == 4 and self.spatial_tokens:  # (B, H, W, C)
            return int(tensor.shape[1] * tensor.shape[2])
        return None

    def _on_input(self, _module: nn.Module, inputs: tuple[Any, ...]) -> None:
        tokens = self._count(inputs[0]) if inputs else None
        if tokens is not None:
            self.tokens_in.append(tokens)

    def _on_output(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        self.tokens_out = self._count(output[0] if isinstance(output, tuple) else output)

    def __enter__(self) -> _TokenProbe:
        for block in self.blocks:
            self._handles.append(block.register_forward_pre_hook(self._on_input))
        if self.blocks:
            self._handles.append(self.blocks[-1].register_forward_hook(self._on_output))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for handle in self._handles:
            handle.remove()
        if not self.tokens_in:
            self.tokens_out = None


def _token_blocks(model: nn.Module) -> tuple[list[nn.Module], bool]:
    """(blocks, whether their inputs are (B, H, W, C) maps) for timm-style token models; ([], False) otherwise."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0:
        return list(blocks), False
    layers = getattr(model, "layers", None)
    if isinstance(layers, (nn.Sequential, nn.ModuleList)):
        stage_blocks = [getattr(layer, "blocks", None) for layer in layers]
        if stage_blocks and all(isinstance(b, (nn.Sequential, nn.ModuleList)) for b in stage_blocks):
            return [block for stage in stage_blocks for block in stage], True
    return [], False


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _inference(precision: str, device: torch.device) -> Iterator[None]:
    with torch.inference_mode(), autocast_context(precision, device.type):
        yield


def _warm_up(candidate: _Candidate, precision: str, iters: int) -> None:
    with _inference(precision, candidate.single_image.device):
        for _ in range(iters):
            candidate.model(candidate.single_image)
        for _ in range(iters):
            candidate.model(candidate.batch)
    _synchronize(candidate.batch.device)


def _forward_memory_growth(candidate: _Candidate, precision: str) -> int:
    """Bytes by which memory grew at most during one untimed forward pass at ``batch_size``."""
    device = candidate.batch.device
    with PeakMemorySampler(device) as sampler, _inference(precision, device):
        candidate.model(candidate.batch)
        _synchronize(device)
    return sampler.growth_bytes


def _measure_round(candidate: _Candidate, precision: str, latency_iters: int, throughput_iters: int) -> None:
    model, device = candidate.model, candidate.batch.device
    with _inference(precision, device):
        model(candidate.single_image)  # refill caches after the previous model; untimed
        _synchronize(device)
        latencies_s = []
        for _ in range(latency_iters):
            start = time.perf_counter()
            model(candidate.single_image)
            _synchronize(device)
            latencies_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(throughput_iters):
            model(candidate.batch)
        _synchronize(device)
        elapsed = time.perf_counter() - start
    candidate.latency_medians_s.append(statistics.median(latencies_s))
    candidate.latency_p90s_s.append(_percentile(latencies_s, 90))
    candidate.throughputs.append(throughput_iters * candidate.batch.shape[0] / elapsed)


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (as numpy's default), ``q`` in [0, 100]."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _to_row(
    candidate: _Candidate,
    img_size: int,
    batch_size: int,
    precision: str,
    device: torch.device,
    reference_throughput: float,
) -> dict[str, Any]:
    throughput = statistics.median(candidate.throughputs)
    row = {
        "model": candidate.spec.label,
        "model_name": candidate.spec.name,
        "model_kwargs": candidate.spec.kwargs_dict,
        "img_size": img_size,
        "batch_size": batch_size,
        "precision": precision,
        "device": str(device),
        "params_m": round(candidate.params_m, 4),
        "gflops": round(candidate.gflops, 6),
        "tokens_per_block": candidate.tokens_per_block,
        "tokens_final": candidate.tokens_final,
        "latency_ms_median": round(1000 * statistics.median(candidate.latency_medians_s), 3),
        "latency_ms_p90": round(1000 * statistics.median(candidate.latency_p90s_s), 3),
        "throughput_img_s": round(throughput, 2),
        "peak_memory_mb": round(candidate.peak_memory_bytes / 2**20, 1),
        "throughput_ratio": round(throughput / reference_throughput, 3),
    }
    return {field: row[field] for field in ROW_FIELDS}


class PeakMemorySampler:
    """Context manager: how much memory grew at most while its body ran (``growth_bytes``).

    CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at entry (peak stats
    reset at entry). CPU: the process's resident set size, sampled by a background thread every
    ``interval_s`` seconds with ``psutil``, peak minus the value at entry; at entry garbage is
    collected and freed heap memory handed back to the OS (glibc ``malloc_trim``) so that the
    baseline is as low as it can be. Sampling can miss peaks shorter than the interval.
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.001) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.growth_bytes = 0
        self._baseline = 0
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: Any = None

    def __enter__(self) -> PeakMemorySampler:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        _release_free_heap()
        self._process = psutil.Process()
        self._baseline = self._peak = self._process.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample_until_stopped, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        self._peak = max(self._peak, self._process.memory_info().rss)

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __exit__(self, *exc_info: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._sample()
            peak = self._peak
        self.growth_bytes = max(0, peak - self._baseline)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None


def _release_free_heap() -> None:
    """Ask glibc to return freed heap pages to the OS (no-op elsewhere)."""
    malloc_trim = _malloc_trim()
    if malloc_trim is not None:
        malloc_trim(0)


def machine_description(device: str = "cpu") -> dict[str, Any]:
    """Where a benchmark ran: CPU model, cores, threads, torch/timm versions, the device, CPU use by others."""
    import psutil
    import timm

    from histotoken.engine.environment import cpu_model

    cpu = cpu_model()
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name(torch_device)
    else:
        device_name = cpu
    return {
        "cpu": cpu,
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "device": str(torch_device),
        "device_name": device_name,
        # CPU use by other work when this was called (call it before a benchmark): above a few
        # percent the timings are unreliable (OpenMP threads end up waiting on each other)
        "cpu_busy_percent": round(cpu_busy_percent(), 1),
    }


def _csv_cell(field: str, value: Any) -> Any:
    if field in ("model_kwargs", "tokens_per_block"):
        return json.dumps(value, sort_keys=True)
    return "" if value is None else value


def write_benchmark(
    rows: Sequence[dict[str, Any]], out_csv: str | Path, machine: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write rows to ``out_csv`` and ``{"machine": ..., "rows": [...]}`` to the ``.json`` beside it.

    In the CSV, ``model_kwargs`` and ``tokens_per_block`` are JSON text and a missing
    ``tokens_final`` is an empty cell; the JSON keeps native values. ``machine`` defaults to
    ``machine_description`` of the rows' device. Both files are written atomically.
    """
    import csv
    import io

    out_csv = Path(out_csv)
    out_json = out_csv.with_suffix(".json")
    if machine is None:
        machine = machine_description(rows[0]["device"] if rows else "cpu")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ROW_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({field: _csv_cell(field, row[field]) for field in ROW_FIELDS})
    document = {"machine": machine, "rows": [{field: row[field] for field in ROW_FIELDS} for row in rows]}
    _write_atomically(out_csv, buffer.getvalue())
    _write_atomically(out_json, json.dumps(document, indent=2) + "\n")
    return out_csv, out_json


def read_benchmark(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a benchmark CSV (or its JSON) with native values, as ``benchmark_models`` returns them."""
    import csv

    path = Path(path)
    if path.suffix == ".json":
        return list(json.loads(path.read_text())["rows"])
    integer_fields = ("img_size", "batch_size")
    text_fields = ("model", "model_name", "precision", "device")
    rows = []
    with path.open(newline="") as handle:
        for record in csv.DictReader(handle):
            row: dict[str, Any] = {}
            for field in ROW_FIELDS:
                value = record[field]
                if field in ("model_kwargs", "tokens_per_block"):
                    row[field] = json.loads(value)
                elif field == "tokens_final":
                    row[field] = int(value) if value else None
                elif field in integer_fields:
                    row[field] = int(value)
                elif field in text_fields:
                    row[field] = value
                else:
                    row[field] = float(value)
            rows.append(row)
    return rows


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False, encoding="utf-8"
    ) as handle:
        handle.write(text)
        temporary = Path(handle.name)
    try:
        # temporary files are created owner-only (0600); give the result the usual file mode
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's file-creation mask, read without changing it (Linux), else the usual 022."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


SUMMARY_COLUMNS = {
    "model": "model",
    "params_m": "params (M)",
    "gflops": "GFLOPs/img",
    "tokens_final": "tokens out",
    "latency_ms_median": "latency ms (median)",
    "latency_ms_p90": "latency ms (p90)",
    "throughput_img_s": "img/s",
    "peak_memory_mb": "peak MB",
    "throughput_ratio": "speed vs first",
}


def summary_table(rows: Sequence[dict[str, Any]]):
    """A pandas DataFrame of the headline figures with readable column names, for printing."""
    import pandas as pd

    frame = pd.DataFrame([{key: row[key] for key in SUMMARY_COLUMNS} for row in rows])
    frame["tokens_final"] = frame["tokens_final"].astype("Int64")
    frame = frame.round({"params_m": 2, "gflops": 3, "latency_ms_median": 2, "latency_ms_p90": 2, "throughput_img_s": 1})
    return frame.rename(columns=SUMMARY_COLUMNS)
