"""glibc keeps memory freed by one training step for the next, once the engine has set its thresholds."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# Three rounds of eight 20 MB tensors, touched and freed, like one step's activations; prints the
# minor page faults of the third round (memory the process had to fault in again).
SCRIPT = """
import resource, sys
import torch
from histotoken.engine.allocator import keep_freed_memory
print(keep_freed_memory())
def step():
    tensors = [torch.ones(5_000_000) for _ in range(8)]
    del tensors
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def third_round_faults(tuning: str) -> tuple[str, int]:
    env = {**os.environ, "HISTOTOKEN_MALLOC_TUNING": tuning}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True)
    applied, faults = result.stdout.split()
    return applied, int(faults)


def test_tuned_malloc_keeps_freed_step_memory_and_the_default_gives_it_back():
    applied, tuned = third_round_faults("1")
    assert applied == "True"
    # 160 MB re-allocated from memory the process kept: next to no page faults
    assert tuned < 2_000
    applied, default = third_round_faults("0")
    assert applied == "False"  # HISTOTOKEN_MALLOC_TUNING=0 leaves glibc's defaults
    # the premise: with glibc's defaults the same 160 MB (about 39,000 pages) is faulted in again
    assert default > 20_000
