"""CPU time of `histotoken --help` and of every `histotoken COMMAND --help` (goal: under 0.5 s each).

Each help runs in a fresh process (the console script when it is installed, else
``python -m histotoken.cli.main``); its CPU time (user + system) is read from
``resource.getrusage(RUSAGE_CHILDREN)`` before and after, so it counts the interpreter's start-up,
the imports and the parser, as a user pays them. The median over ``--rounds`` is printed per
command, with the CPU model, and whether torch or timm was imported (they must not be).

    python benchmarks/cli_help.py              # 3 rounds
    python benchmarks/cli_help.py --rounds 1
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

GOAL_S = 0.5


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def help_command(arguments: list[str]) -> list[str]:
    script = Path(sys.executable).parent / "histotoken"
    if script.is_file():
        return [sys.executable, str(script), *arguments]
    found = shutil.which("histotoken")
    return [found, *arguments] if found else [sys.executable, "-m", "histotoken.cli.main", *arguments]


def child_cpu_seconds(command: list[str]) -> tuple[float, bool]:
    """(user + system CPU seconds of one run of ``command``, whether it imported torch or timm)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr[-500:]}")
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, bool({"torch", "timm"} & imported)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from histotoken.cli.main import COMMANDS

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); Python {platform.python_version()}")
    print("importtime is on in the measured processes (adds a little CPU time)")
    print(f"{'command':<28}{'CPU s (median)':>16}{'torch/timm':>12}")
    worst = 0.0
    for command in [None, *COMMANDS]:
        arguments = ["--help"] if command is None else [command, "--help"]
        runs = [child_cpu_seconds(help_command(arguments)) for _ in range(args.rounds)]
        median = statistics.median(seconds for seconds, _ in runs)
        heavy = any(imported for _, imported in runs)
        worst = max(worst, median)
        print(f"{'histotoken ' + ' '.join(arguments):<28}{median:>16.3f}{'imported' if heavy else 'no':>12}")
    print(f"slowest: {worst:.3f} s of CPU (goal: under {GOAL_S} s)")


if __name__ == "__main__":
    main()
