"""How the slide aggregators' cost grows with the number of tiles per slide: time, peak memory, growth exponent.

Every aggregator of ``histotoken.mil.aggregators`` (``create_aggregator(name, D, 2)``, evaluation mode, random
weights) classifies one bag of random ``(N, D)`` tile features at N = 1,000, 10,000 and 50,000 (D = 384, the
width of ViT-S features), under ``torch.inference_mode``. Time is the median of ``--rounds`` calls; peak memory is
``histotoken.mil.cost.measure``'s on the first call at each size, after the C heap's free memory is given back
to the system (process RSS growth sampled every 1 ms on CPU, so calls under a millisecond can show 0;
``torch.cuda.max_memory_allocated`` on a GPU). The growth exponent is
the log-log slope of time (and of memory) between consecutive sizes: 1 is linear in N, 2 quadratic, about 0
means the aggregator reads a fixed number of tiles (``transmil``, ``token_merging``, ``tokenlearner`` and
``topk`` subsample bags above their ``max_tokens`` at evaluation; the column ``kept`` shows the tokens that
reached the classifier). ``--backward`` times a training step (forward and backward, training mode) instead.

    python benchmarks/mil_scaling.py                         # 1k, 10k, 50k tiles, D=384, 3 rounds
    python benchmarks/mil_scaling.py --dim 512 --sizes 1000 10000 100000 --backward
    python benchmarks/mil_scaling.py --tiny                  # smoke run (tests/test_benchmarks_smoke.py)
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aggregators", nargs="+", help="names from histotoken.mil.aggregators (default: all)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 10000, 50000], help="tiles per slide")
    parser.add_argument("--dim", type=int, default=384, help="feature width D")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backward", action="store_true", help="time forward + backward in training mode")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--tiny", action="store_true", help="smoke run: 64 and 256 tiles, D=32, 1 round")
    args = parser.parse_args(argv)
    if args.tiny:
        args.sizes, args.dim, args.rounds = [64, 256], 32, 1
    if sorted(args.sizes) != args.sizes or len(set(args.sizes)) != len(args.sizes) or args.sizes[0] < 1:
        parser.error(f"--sizes must be increasing positive tile counts, got {args.sizes}")
    return args


def growth_exponent(sizes: list[int], values: list[float]) -> list[float]:
    """log(v2 / v1) / log(n2 / n1) between consecutive sizes (NaN where a value is not positive)."""
    slopes = []
    for (n1, v1), (n2, v2) in zip(zip(sizes, values), zip(sizes[1:], values[1:])):
        slopes.append(math.log(v2 / v1) / math.log(n2 / n1) if v1 > 0 and v2 > 0 else float("nan"))
    return slopes


def release_free_heap() -> None:
    """Give the C heap's free memory back to the system (glibc), so RSS growth shows the next call's peak."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    import torch

    from histotoken.engine.environment import cpu_model
    from histotoken.mil.aggregators import AGGREGATORS, create_aggregator
    from histotoken.mil.cost import measure

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = args.aggregators or list(AGGREGATORS)
    generator = torch.Generator().manual_seed(0)
    bags = {n: torch.randn(n, args.dim, generator=generator).to(device) for n in args.sizes}

    rows = []
    for name in names:
        torch.manual_seed(0)
        model = create_aggregator(name, args.dim, 2).to(device)
        model.train(args.backward)

        def call(bag, model=model):
            if not args.backward:
                with torch.inference_mode():
                    return model(bag)
            output = model(bag)
            output.logits.sum().backward()
            model.zero_grad(set_to_none=True)
            return output

        def synchronised(bag):
            output = call(bag)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return output

        row = {"aggregator": name, "ms": [], "peak_mb": [], "kept": []}
        synchronised(bags[args.sizes[0]])  # one-time set-up (kernels, lazy buffers) outside the measurements
        for n in args.sizes:
            release_free_heap()  # memory freed by earlier calls would hide this call's growth
            output, _, peak_mb = measure(lambda n=n: synchronised(bags[n]), args.device)  # also the warm-up
            times = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                synchronised(bags[n])
                times.append((time.perf_counter() - start) * 1000)
            row["ms"].append(statistics.median(times))
            row["peak_mb"].append(peak_mb)
            row["kept"].append(int(output.tokens_kept))
        row["time_exponent"] = growth_exponent(args.sizes, row["ms"])
        row["memory_exponent"] = growth_exponent(args.sizes, row["peak_mb"])
        rows.append(row)
        del model

    where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU: {cpu_model()}, {torch.get_num_threads()} threads"
    mode = "forward + backward (training mode)" if args.backward else "forward (evaluation mode, inference_mode)"
    print(f"{where}; torch {torch.__version__}; fp32; {mode}; D={args.dim}; median of {args.rounds} rounds")
    sizes = [f"{n:,}" for n in args.sizes]
    pairs = [f"{a}->{b}" for a, b in zip(sizes, sizes[1:])]
    print(f"{'aggregator':<15}" + "".join(f"{'ms @' + s:>13}" for s in sizes) + "".join(f"{'MB @' + s:>12}" for s in sizes)
          + "".join(f"{'kept @' + s:>14}" for s in sizes) + "".join(f"{'t-exp ' + p:>22}" for p in pairs)
          + "".join(f"{'m-exp ' + p:>22}" for p in pairs))
    for row in rows:
        print(f"{row['aggregator']:<15}" + "".join(f"{v:>13.2f}" for v in row["ms"])
              + "".join(f"{v:>12.1f}" for v in row["peak_mb"]) + "".join(f"{v:>14,}" for v in row["kept"])
              + "".join(f"{v:>22.2f}" for v in row["time_exponent"]) + "".join(f"{v:>22.2f}" for v in row["memory_exponent"]))
    return rows


if __name__ == "__main__":
    main()
