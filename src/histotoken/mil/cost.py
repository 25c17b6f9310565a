"""Cost of one slide through an aggregator: tokens in, tokens kept, milliseconds and peak memory.

Peak memory is measured with ``histotoken.engine.benchmark.PeakMemorySampler``: on CPU the growth of
the process's resident set size (RSS, sampled every millisecond by a thread, so peaks shorter than
that can be missed, and it includes reading the features from disk); on CUDA
``torch.cuda.max_memory_allocated``. Python's ``tracemalloc`` is not used: it does not see
torch's tensor allocations.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

MEMORY_METHOD = "process RSS growth (psutil, sampled every 1 ms) on CPU; torch.cuda.max_memory_allocated on CUDA"


@dataclasses.dataclass(frozen=True)
class SlideCost:
    tokens_in: int
    tokens_kept: int
    ms: float
    peak_memory_mb: float


def measure(fn: Callable[[], T], device: str = "cpu") -> tuple[T, float, float]:
    """Run ``fn`` once: (its result, wall milliseconds, peak memory growth in MiB)."""
    from histotoken.engine.benchmark import PeakMemorySampler

    with PeakMemorySampler(device) as sampler:
        start = time.perf_counter()
        result = fn()
        elapsed_ms = (time.perf_counter() - start) * 1000
    return result, elapsed_ms, sampler.growth_bytes / 2**20
