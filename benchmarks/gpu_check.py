"""GPU check: train DeiT-S at 224 px in bf16 for one epoch on a BreakHis-sized synthetic set, evaluate it, predict.

One script for a machine with a GPU (meant to finish in under 10 minutes on one GPU). Everything goes through
histotoken's own functions: ``data.synthetic.generate_synthetic_breakhis`` (the data), ``engine.fit.train``
(one epoch, patient-disjoint split, ``precision auto`` = bf16 on a GPU that has it), ``engine.evaluate.evaluate_run``
(test patients, all magnifications), ``engine.predict.predict_images`` (the `histotoken predict` path, PNG
decoding included) and ``engine.benchmark.benchmark_models`` (DeiT-S against TokenLearner-ViT-S,
cnnprune-ViT-S at keep_ratio 0.5 and DeiT-S with ToMe merging r=13, interleaved rounds). It prints

- images/s of training (train images / the epoch's time, validation included), evaluation and predict, and their wall times;
- peak GPU memory (``torch.cuda.max_memory_allocated`` over the whole process, and the epoch's own record);
- throughput of the four models and their ratio to DeiT-S;
- with two or more GPUs, a 2-process DDP run (``histotoken train --devices 2 --strategy ddp``) and its outcome;

and writes the figures to ``OUT/gpu_check.json``. Without a GPU it runs on the CPU (slowly at full size).

    python benchmarks/gpu_check.py                           # 7,909 -> 8,000 synthetic images at 700x460, DeiT-S
    python benchmarks/gpu_check.py --data ~/data/BreaKHis    # the real BreakHis instead of the synthetic set
    python benchmarks/gpu_check.py --images 2000 --batch-size 256 --out /scratch/gpu_check
    python benchmarks/gpu_check.py --tiny                    # CPU smoke run (tests/test_benchmarks_smoke.py)

The synthetic set has 8 subtypes x 4 magnifications x 10 patients, with ``--images`` / 320 images per patient and
magnification (rounded up); it is drawn with one process per CPU core (about 0.23 s per 700x460 image per core on
a 2-core EPYC) and reused from OUT/data when present.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

FULL = {"images": 7909, "size": (700, 460), "img_size": 224, "batch_size": 128, "bench_batch": 64,
        "model": "deit_small_patch16_224",
        "compare": ["tokenlearner_vit_small", "cnnprune_vit_small:keep_ratio=0.5", "{model}:merge_r=13"],
        "patients_per_class": 10, "bootstrap": 200, "rounds": 3}
TINY = {"images": 96, "size": (64, 48), "img_size": 64, "batch_size": 16, "bench_batch": 2,
        "model": "deit_tiny_patch16_224",
        "compare": ["tokenlearner_vit_tiny", "cnnprune_vit_tiny:keep_ratio=0.5", "{model}:merge_r=2"],
        "patients_per_class": 3, "bootstrap": 20, "rounds": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: 96 images at 64x48, DeiT-Ti at 64 px")
    parser.add_argument("--images", type=int, help="synthetic images to draw (default 7909, BreakHis's count)")
    parser.add_argument("--data", help="an existing BreakHis (or synthetic) folder instead of drawing one")
    parser.add_argument("--out", help="work folder (default: a new temporary folder)")
    parser.add_argument("--model", help="the model trained (default deit_small_patch16_224)")
    parser.add_argument("--img-size", type=int)
    parser.add_argument("--batch-size", type=int, help="training and evaluation batch size (default 128)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--precision", default="auto", help="auto (bf16 on a GPU that has it), 32-true, bf16-mixed")
    parser.add_argument("--num-workers", type=int, help="data-loader workers (default: min(8, CPU cores - 1))")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of the throughput comparison (default 3)")
    parser.add_argument("--no-ddp", action="store_true", help="skip the 2-process DDP check")
    return parser.parse_args(argv)


def synthetic_layout(images: int, patients_per_class: int) -> tuple[int, int]:
    """(patients per class, images per patient and magnification) giving at least ``images`` images."""
    per_patient = max(1, math.ceil(images / (8 * 4 * patients_per_class)))
    return patients_per_class, per_patient


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    preset = TINY if args.tiny else FULL
    images = args.images or preset["images"]
    model = args.model or preset["model"]
    img_size = args.img_size or preset["img_size"]
    batch_size = args.batch_size or preset["batch_size"]
    rounds = args.rounds or preset["rounds"]
    cores = os.cpu_count() or 1
    num_workers = args.num_workers if args.num_workers is not None else (0 if args.tiny else min(8, cores - 1))

    import pandas as pd
    import torch

    import histotoken  # noqa: F401  (registers our model families)
    from histotoken.cli.main import configure_logging
    from histotoken.config import RunConfig
    from histotoken.data.synthetic import generate_synthetic_breakhis
    from histotoken.engine.benchmark import benchmark_models
    from histotoken.engine.environment import cpu_model
    from histotoken.engine.evaluate import evaluate_run
    from histotoken.engine.fit import train
    from histotoken.engine.precision import resolve_precision
    from histotoken.engine.predict import predict_images

    configure_logging(verbose=False)
    warnings.filterwarnings("ignore")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"CPU: {cpu_model()} ({cores} cores)"
    accelerator = "gpu" if cuda else "cpu"
    precision = resolve_precision(args.precision, accelerator, img_size)
    print(f"device: {device}; {torch.cuda.device_count() if cuda else 0} GPU(s); torch {torch.__version__}; "
          f"precision {precision}")
    figures: dict = {"device": device, "precision": precision, "model": model, "img_size": img_size,
                     "batch_size": batch_size, "epochs": args.epochs}

    # 1. data
    if args.data:
        data = Path(args.data).expanduser()
        print(f"data: {data} (given)")
    else:
        data = out / "data"
        patients, per_patient = synthetic_layout(images, preset["patients_per_class"])
        start = time.perf_counter()
        made = generate_synthetic_breakhis(data, patients_per_class=patients, images_per_patient=per_patient,
                                           size=preset["size"], seed=0, workers=1 if args.tiny else cores)
        seconds = time.perf_counter() - start
        figures["synthetic"] = {"images": made.n_images, "created": made.created, "seconds": seconds}
        print(f"synthetic BreakHis: {made.n_images} images ({made.created} drawn now) at "
              f"{preset['size'][0]}x{preset['size'][1]} in {seconds:.1f} s with {1 if args.tiny else cores} "
              "process(es)")

    # 2. train one epoch
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    config = RunConfig(data=str(data), model=model, task="subtype", train_domain="all", img_size=img_size,
                       epochs=args.epochs, batch_size=batch_size, precision=precision, accelerator=accelerator,
                       devices="1", num_workers=num_workers, bootstrap=preset["bootstrap"], seed=0)
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    train(config, run_dir, progress_bar=False)
    train_wall = time.perf_counter() - start
    split = pd.read_csv(run_dir / "splits.csv")
    metrics = pd.read_csv(run_dir / "metrics.csv")
    n_train = int((split["split"] == "train").sum())
    epoch_s = float(metrics["epoch_time_s"].iloc[-1])
    figures["train"] = {"images": n_train, "epoch_s": epoch_s, "img_s": n_train / epoch_s, "wall_s": train_wall,
                        "epoch_peak_memory_mb": float(metrics["peak_memory_mb"].iloc[-1])}

    # 3. evaluate on the test patients of every magnification
    start = time.perf_counter()
    evaluation = evaluate_run(run_dir, "all", batch_size=batch_size, n_bootstrap=preset["bootstrap"])
    eval_s = time.perf_counter() - start
    figures["evaluate"] = {"images": evaluation["n_images"], "seconds": eval_s, "img_s": evaluation["n_images"] / eval_s,
                           "accuracy": evaluation["accuracy"], "macro_f1": evaluation["macro_f1"]}

    # 4. predict the test images from their PNG files (decode included)
    files = split.loc[split["split"] == "test", "path"].tolist()
    start = time.perf_counter()
    predicted = predict_images(run_dir, files, batch_size=batch_size, num_workers=num_workers)
    predict_s = time.perf_counter() - start
    figures["predict"] = {"images": len(files), "seconds": predict_s, "img_s": len(files) / predict_s,
                          "scored": int((predicted["error"].fillna("") == "").sum())}
    if cuda:
        figures["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20

    # 5. throughput: the model against the token-efficient families, interleaved rounds
    compare = [model] + [name.format(model=model) for name in preset["compare"]]
    rows = benchmark_models(compare, img_size=img_size, batch_size=preset["bench_batch"], precision=precision,
                            num_classes=8, rounds=rounds, device="cuda" if cuda else "cpu")
    figures["throughput"] = [{key: row[key] for key in ("model", "throughput_img_s", "throughput_ratio",
                                                        "latency_ms_median", "peak_memory_mb", "tokens_final")}
                             for row in rows]

    # 6. DDP on two GPUs, through the command line (Lightning starts the second process)
    figures["ddp"] = ddp_check(data, model, img_size, batch_size, out, cuda and torch.cuda.device_count() >= 2
                               and not args.no_ddp)

    print_figures(figures)
    (out / "gpu_check.json").write_text(json.dumps(figures, indent=2, default=str))
    print(f"figures: {out / 'gpu_check.json'}")
    return figures


def ddp_check(data: Path, model: str, img_size: int, batch_size: int, out: Path, enabled: bool) -> dict:
    if not enabled:
        return {"ran": False, "why": "fewer than two GPUs (or --no-ddp)"}
    command = shutil.which("histotoken", path=str(Path(sys.executable).parent)) or shutil.which("histotoken")
    if command is None:
        return {"ran": False, "why": "the `histotoken` command is not on PATH"}
    run_dir = out / "run_ddp"
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    finished = subprocess.run(
        [command, "train", "--data", str(data), "--model", model, "--task", "subtype", "--img-size", str(img_size),
         "--batch-size", str(batch_size), "--epochs", "1", "--devices", "2", "--strategy", "ddp", "--out",
         str(run_dir), "bootstrap=100"],
        capture_output=True, text=True,
    )
    seconds = time.perf_counter() - start
    evaluated = sorted(path.name for path in (run_dir / "eval").glob("*.json")) if (run_dir / "eval").is_dir() else []
    return {"ran": True, "returncode": finished.returncode, "seconds": seconds, "eval_files": evaluated,
            "ok": finished.returncode == 0 and bool(evaluated), "stderr_tail": finished.stderr[-2000:]}


def print_figures(figures: dict) -> None:
    train, evaluate, predict = figures["train"], figures["evaluate"], figures["predict"]
    print(f"\n{figures['model']} at {figures['img_size']} px, {figures['precision']}, batch {figures['batch_size']}, "
          f"on {figures['device']}")
    print(f"train:    {train['img_s']:8.1f} img/s ({train['images']} images, epoch {train['epoch_s']:.1f} s with its "
          f"validation; wall {train['wall_s']:.1f} s with the decoded image store and the test evaluation)")
    print(f"evaluate: {evaluate['img_s']:8.1f} img/s ({evaluate['images']} test images in {evaluate['seconds']:.1f} s; "
          f"accuracy {evaluate['accuracy']:.3f}, macro-F1 {evaluate['macro_f1']:.3f} after "
          f"{figures['epochs']} epoch(s))")
    print(f"predict:  {predict['img_s']:8.1f} img/s ({predict['images']} PNG files in {predict['seconds']:.1f} s, "
          "decoding included)")
    if "peak_gpu_memory_mb" in figures:
        print(f"peak GPU memory: {figures['peak_gpu_memory_mb']:.0f} MB (process), "
              f"{train['epoch_peak_memory_mb']:.0f} MB (training epoch record)")
    print(f"{'model':<40}{'img/s':>10}{'x ref':>8}{'latency ms':>12}{'tokens':>8}")
    for row in figures["throughput"]:
        print(f"{row['model']:<40}{row['throughput_img_s']:>10.1f}{row['throughput_ratio']:>8.2f}"
              f"{row['latency_ms_median']:>12.2f}{row['tokens_final'] if row['tokens_final'] is not None else '':>8}")
    ddp = figures["ddp"]
    if ddp["ran"]:
        print(f"DDP (2 processes): {'ok' if ddp['ok'] else 'FAILED'} in {ddp['seconds']:.0f} s, "
              f"evaluations {ddp['eval_files']}" + ("" if ddp["ok"] else f"\n{ddp['stderr_tail']}"))
    else:
        print(f"DDP check skipped: {ddp['why']}")


if __name__ == "__main__":
    main()
