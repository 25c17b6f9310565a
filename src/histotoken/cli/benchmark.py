"""``histotoken benchmark``: what each model costs at inference, measured side by side."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

DESCRIPTION = """\
Measure what models cost when they classify images (inference only, random weights: cost does
not depend on what a model learned). All models are built in one process and measured in
turns, round after round, so that a busy or throttling machine slows them all alike; each
figure is the median over rounds. Compare models within one table, not across runs.

Figures, one row per model:
  params (M)     learnable weights, in millions (model size on disk ~ 4 bytes each)
  GFLOPs/img     billions of arithmetic operations to classify one image (one multiply-add
                 = 2; papers quoting "MACs" give half), counted in one fp32 forward pass
  tokens         tokens_per_block: how many tokens (image patches, or learned summaries of
                 them; class token included) each transformer block processed, and
                 tokens_final: how many reach the classifier. Token-efficient models
                 lower these; empty for CNNs
  latency ms     time to classify ONE image (median and 90th percentile): the wait per
                 patch in an interactive viewer
  img/s          images per second in batches of --batch-size: how fast a whole slide's
                 patches or a test set get scored
  peak MB        memory needed: the model's weights plus the largest growth during one
                 batch (CPU: process memory sampled every ms; CUDA: allocator peak)
  speed vs first throughput_ratio, img/s divided by the FIRST --model's img/s
                 (2.0 = twice as many images per second as the reference)

A model is a timm name, optionally with arguments: NAME:key=value,... e.g.
cnnprune_vit_small:keep_ratio=0.5 or deit_small_patch16_224:merge_r=13 (token merging).

Example:
  histotoken benchmark --model deit_small_patch16_224 --model tokenlearner_vit_small \\
      --model cnnprune_vit_small:keep_ratio=0.5 --model deit_small_patch16_224:merge_r=13

The table is printed; every figure goes to --out (CSV) and a JSON beside it that also
describes the machine (CPU model, cores, torch version).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "benchmark",
        help="measure params, FLOPs, tokens, latency, throughput and memory of models side by side",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", dest="models", action="append", required=True, metavar="NAME",
        help="model spec NAME or NAME:key=value,... (repeat; the first is the reference for 'speed vs first')",
    )
    parser.add_argument("--img-size", type=int, default=224, metavar="PX", help="image side in pixels (default: 224)")
    parser.add_argument(
        "--batch-size", type=int, default=32, metavar="N", help="batch size of the throughput and memory figures (default: 32)"
    )
    parser.add_argument(
        "--precision", default="auto", choices=["auto", "32-true", "bf16-mixed", "16-mixed"],
        help="numeric precision; auto = bf16 where the CPU/GPU runs it natively, else fp32 (default: auto)",
    )
    parser.add_argument(
        "--merge-r", type=int, default=0, metavar="N",
        help="token merging: merge N tokens per block in every model without its own merge_r (ViT/DeiT only)",
    )
    parser.add_argument("--num-classes", type=int, default=8, metavar="N", help="classifier outputs (default: 8, the subtypes)")
    parser.add_argument(
        "--rounds", type=int, default=5, metavar="N",
        help="measurement rounds over all models; more rounds, steadier medians (default: 5)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    parser.add_argument("--out", default="benchmark.csv", metavar="FILE.csv", help="CSV to write; a .json goes beside it (default: benchmark.csv)")
    return parser


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import pandas as pd

    from histotoken.engine.benchmark import (
        benchmark_models,
        machine_description,
        summary_table,
        write_benchmark,
    )

    machine = machine_description(args.device)  # before the run: its CPU use is other work's
    progress_bar = _progress_bar()
    with progress_bar.redirect_logging() if progress_bar else contextlib.nullcontext():
        rows = benchmark_models(
            args.models,
            img_size=args.img_size,
            batch_size=args.batch_size,
            precision=args.precision,
            merge_r=args.merge_r,
            num_classes=args.num_classes,
            rounds=args.rounds,
            device=args.device,
            progress=progress_bar.update if progress_bar else None,
        )
    csv_path, json_path = write_benchmark(rows, Path(args.out), machine=machine)

    first = rows[0]
    print(
        f"{first['device']} ({machine['device_name']}, {machine['torch_threads']} threads), "
        f"{first['precision']}, {first['img_size']} px, batch {first['batch_size']}, "
        f"median of {args.rounds} rounds; 'speed vs first' is relative to {first['model']}"
    )
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(summary_table(rows).to_string(index=False))
    print(f"CSV:  {csv_path}")
    print(f"JSON: {json_path}")
    return 0


class _ProgressBar:
    """Adapts tqdm (installed with lightning) to the benchmark's ``progress(done, total, message)``."""

    def __init__(self, tqdm_class) -> None:
        self._tqdm_class = tqdm_class
        self._bar = None

    @contextlib.contextmanager
    def redirect_logging(self) -> Iterator[None]:
        """Log lines above the bar instead of through it; close the bar at the end."""
        from tqdm.contrib.logging import logging_redirect_tqdm

        try:
            with logging_redirect_tqdm(tqdm_class=self._tqdm_class):
                yield
        finally:
            self.close()

    def update(self, done: int, total: int, message: str) -> None:
        if self._bar is None:
            self._bar = self._tqdm_class(total=total, desc="benchmark", unit="step", leave=False)
        self._bar.set_postfix_str(message, refresh=False)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _progress_bar() -> _ProgressBar | None:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return _ProgressBar(tqdm)
