"""glibc's malloc, set up for training: memory freed by one step is kept for the next one.

By default glibc returns freed memory to the system (``munmap`` of large blocks, trimming the top of
the heap) and adapts its thresholds as it goes. A training step frees and re-allocates the same
activation and gradient buffers every time; when glibc has given them back, the next step touches
fresh pages and each one costs a page fault and zeroing. In the engine, whose in-memory checkpoint
and metrics change the heap's layout, that happened on every epoch: 20,000-40,000 page faults per
epoch for ResNet-18 at 64 px, and the convolutions and the optimiser ran 5-15% slower per call than
in a bare loop (benchmarks/engine_overhead.py). PyTorch's CPU performance guide gives the same advice
(keep freed memory: jemalloc, tcmalloc, or these glibc settings).

:func:`keep_freed_memory` fixes glibc's thresholds (``mallopt``) for this process and the data-loader
workers it forks: blocks up to 32 MiB come from the heap, and the heap's top is returned to the system
only beyond 512 MiB free. Set ``HISTOTOKEN_MALLOC_TUNING=0`` to leave glibc's defaults (e.g. when
another allocator is preloaded, or to compare).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 512 * 1024 * 1024

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds for training, once per process; True when they are in effect.

    A no-op (False) off Linux/glibc, or with ``HISTOTOKEN_MALLOC_TUNING=0``.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("HISTOTOKEN_MALLOC_TUNING", "1").strip() in {"0", "false", "no", "off"}:
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; fixing the mmap threshold also stops glibc's own adapting of both
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


def in_effect() -> bool:
    """Whether :func:`keep_freed_memory` has set glibc's thresholds in this process (for environment.json)."""
    return _applied is True
