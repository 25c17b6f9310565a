"""The README's efficiency table: token-efficient models against DeiT-S and common baselines.

Measures every model side by side in one process (``histotoken.engine.benchmark``) at 224 px,
writes ``benchmarks/results/efficiency.{csv,json,md}`` and prints the markdown. The markdown
checks the project's speed targets (throughput relative to DeiT-S, the first model).

    python benchmarks/efficiency_table.py                     # full table, a few minutes on 2 cores
    python benchmarks/efficiency_table.py --rounds 3 --models deit_small_patch16_224 resnet18
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from histotoken.engine.benchmark import benchmark_models, machine_description, write_benchmark
from histotoken.models.factory import parse_model_spec

REFERENCE = "deit_small_patch16_224"

DEFAULT_MODELS = [
    REFERENCE,
    "tokenlearner_vit_small",
    "cnnprune_vit_small:keep_ratio=0.5",
    "cnnprune_vit_small:keep_ratio=0.25",
    "deit_small_patch16_224:merge_r=13",
    "tokenmixer_small",
    "resnet18",
    "mixer_s16_224",
    "swin_tiny_patch4_window7_224",
]

# (model spec, comparison, throughput ratio vs DeiT-S)
TARGETS = [
    ("tokenlearner_vit_small", ">=", 1.8),
    ("cnnprune_vit_small:keep_ratio=0.5", ">=", 1.5),
    ("deit_small_patch16_224:merge_r=13", ">=", 1.5),
    ("tokenmixer_small", ">", 1.0),
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=224, help="image side in pixels (default: 224)")
    parser.add_argument("--batch-size", type=int, default=32, help="throughput batch size (default: 32)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds (default: 5)")
    parser.add_argument(
        "--models", nargs="+", default=DEFAULT_MODELS, metavar="SPEC",
        help="model specs to measure instead of the default list; the first is the reference",
    )
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: torch's choice, one per core). 1 keeps ratios steadier when "
        "other work shares the machine",
    )
    parser.add_argument(
        "--out-dir", type=Path, default=RESULTS_DIR, help=f"where to write efficiency.* (default: {RESULTS_DIR})"
    )
    return parser.parse_args(argv)


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One markdown bullet per target: met / not met from the measured throughput ratio."""
    by_label = {row["model"]: row for row in rows}
    reference_ok = rows[0]["model_name"] == REFERENCE and not rows[0]["model_kwargs"]
    lines = []
    for spec_text, comparison, threshold in TARGETS:
        label = parse_model_spec(spec_text).label
        row = by_label.get(label)
        goal = f"`{label}` throughput {comparison} {threshold:g}x DeiT-S"
        if row is None or not reference_ok:
            lines.append(f"- {goal}: not measured")
            continue
        ratio = row["throughput_ratio"]
        met = ratio >= threshold if comparison == ">=" else ratio > threshold
        lines.append(f"- {goal}: measured {ratio:.3f}x, **{'met' if met else 'not met'}**")
    return lines


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown_report(rows: list[dict[str, Any]], machine: dict[str, Any], rounds: int) -> str:
    first = rows[0]
    columns = [
        ("model", "model"),
        ("params_m", "params (M)"),
        ("gflops", "GFLOPs/img"),
        ("tokens_final", "tokens out"),
        ("latency_ms_median", "latency ms (median)"),
        ("latency_ms_p90", "latency ms (p90)"),
        ("throughput_img_s", "img/s"),
        ("peak_memory_mb", "peak MB"),
        ("throughput_ratio", "speed vs DeiT-S"),
    ]
    lines = [
        "# Inference efficiency",
        "",
        f"Machine: {machine['cpu']}, {machine['cores_logical']} logical cores, "
        f"{machine['torch_threads']} torch threads; device {machine['device']} ({machine['device_name']}); "
        f"torch {machine['torch']}, timm {machine['timm']}, {machine['platform']}; "
        f"CPU use by other work just before the run: {machine['cpu_busy_percent']:.0f}%.",
        "",
        f"Settings: {first['img_size']} px, batch {first['batch_size']} for throughput and memory, batch 1 "
        f"for latency, precision {first['precision']}, random weights, {len(rows)} models measured side by "
        f"side and interleaved, median of {rounds} round{'s' if rounds != 1 else ''}. GFLOPs count one multiply-add as 2 FLOPs "
        "(fp32, batch 1). 'speed vs DeiT-S' is throughput divided by the first row's. Peak MB is weights "
        "plus the largest memory growth during one batch.",
        "",
        "| " + " | ".join(title for _, title in columns) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[key]) for key, _ in columns) + " |")
    lines += ["", "Tokens per block (class token included):", ""]
    for row in rows:
        tokens = row["tokens_per_block"]
        lines.append(f"- `{row['model']}`: {_compress(tokens) if tokens else 'CNN (no tokens)'}")
    lines += ["", "Targets (throughput at batch size above, relative to DeiT-S):", "", *target_lines(rows), ""]
    return "\n".join(lines)


def _compress(values: list[int]) -> str:
    """``[197, 197, 197, 99]`` -> ``197 x3, 99``."""
    parts: list[str] = []
    index = 0
    while index < len(values):
        run = 1
        while index + run < len(values) and values[index + run] == values[index]:
            run += 1
        parts.append(f"{values[index]} x{run}" if run > 1 else str(values[index]))
        index += run
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_description("cpu")  # before the run: its CPU use is other work's
    rows = benchmark_models(args.models, img_size=args.img_size, batch_size=args.batch_size, rounds=args.rounds)
    csv_path, json_path = write_benchmark(rows, args.out_dir / "efficiency.csv", machine=machine)
    markdown = markdown_report(rows, machine, args.rounds)
    md_path = args.out_dir / "efficiency.md"
    md_path.write_text(markdown)
    print(markdown)
    print(f"wrote {csv_path}, {json_path}, {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
