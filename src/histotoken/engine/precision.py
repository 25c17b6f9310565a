"""Which numeric precision a run uses when the user does not say.

On CPU, bf16 autocast is the largest speed lever where the processor has native bf16
matrix units (AVX-512 BF16 / AMX); elsewhere fp32. On CUDA, bf16 where supported, else fp16.
"""

from __future__ import annotations

import functools

import torch

VALID_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "auto")


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AMX or AVX-512 BF16)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return any(flag in flags for flag in (" amx_bf16", " avx512_bf16"))


# Below this input size bf16 autocast on CPU is overhead-bound and often slower than fp32
# (measured on the 2-core AVX-512/AMX machines this project runs on; see DESIGN.md).
CPU_BF16_MIN_IMG_SIZE = 128


def resolve_precision(precision: str = "auto", accelerator: str = "cpu", img_size: int | None = None) -> str:
    """Return a Lightning precision string; ``auto`` picks the fastest safe one for the hardware."""
    if precision not in VALID_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(VALID_PRECISIONS)}")
    if precision != "auto":
        return precision
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if img_size is not None and img_size < CPU_BF16_MIN_IMG_SIZE:
        return "32-true"
    return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"


def autocast_context(precision: str, device_type: str = "cpu"):
    """A torch autocast context matching a Lightning precision string (for code outside Lightning)."""
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device_type=device_type, dtype=torch.float16)
    return torch.autocast(device_type=device_type, enabled=False)
