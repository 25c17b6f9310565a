"""Wall time of a linear probe (`histotoken train --probe linear`) against fine-tuning the same backbone.

On a small synthetic BreakHis (``histotoken.data.synthetic``; by default 8 subtypes x 4 patients x 4 images at
100X, 350x230 px) and one patient-disjoint split (both runs use ``engine.fit.prepare_split`` with the same seed;
the script checks that their splits.csv are identical), it times

- ``probe, embed included``: ``features.probe.train_probe`` into a fresh features folder (extraction by
  ``features.embed`` in fp32, then StandardScaler + LogisticRegression, evaluation with intervals);
- ``probe, embed excluded``: ``train_probe`` again into a new run folder on the same features (reused);
- ``fine-tune``: ``engine.fit.train`` for ``--epochs`` epochs (its decoded image store built first, its
  precision the one `train` picks for this machine, in-domain evaluation included);

and prints the ratios and the balanced accuracy of each on the test patients. The backbone has random
weights unless ``--weights FILE`` (a .safetensors or timm checkpoint) is given: with random weights the probe
reads random features and both accuracies say little; the times are what this script is for.

    python benchmarks/probe_vs_finetune.py                          # resnet18 at 224 px, 3 epochs
    python benchmarks/probe_vs_finetune.py --model vit_small_patch16_224 --weights vit_s.safetensors
    python benchmarks/probe_vs_finetune.py --tiny                   # smoke run (tests/test_benchmarks_smoke.py)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--weights", help="backbone weights (.safetensors or timm checkpoint) for both runs")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--patients", type=int, default=4, help="synthetic patients per subtype")
    parser.add_argument("--images", type=int, default=4, help="synthetic images per patient")
    parser.add_argument("--size", type=int, nargs=2, default=[350, 230], metavar=("W", "H"), help="synthetic image size")
    parser.add_argument("--task", default="binary", choices=["binary", "subtype"])
    parser.add_argument("--out", help="work folder (default: a new temporary folder)")
    parser.add_argument("--tiny", action="store_true", help="smoke run: vit_mini at 32 px, 1 epoch, 64x48 images")
    args = parser.parse_args(argv)
    if args.tiny:
        args.model, args.img_size, args.epochs, args.batch_size = "vit_mini_patch4_32", 32, 1, 16
        args.patients, args.images, args.size = 4, 2, [64, 48]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import json

    import pandas as pd
    import torch

    import histotoken  # noqa: F401  (registers our families)
    from histotoken.cli.main import configure_logging
    from histotoken.config import RunConfig
    from histotoken.data.synthetic import generate_synthetic_breakhis
    from histotoken.engine.environment import cpu_model
    from histotoken.engine.fit import train
    from histotoken.engine.precision import resolve_precision
    from histotoken.features.probe import ProbeSettings, train_probe

    configure_logging(verbose=False)
    warnings.filterwarnings("ignore")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="probe-vs-finetune-"))
    data = out / "data"
    generate_synthetic_breakhis(data, patients_per_class=args.patients, images_per_patient=args.images,
                                magnifications=(100,), size=tuple(args.size), seed=0)
    for folder in ("features", "probe", "probe_again", "finetune"):
        shutil.rmtree(out / folder, ignore_errors=True)
    config = RunConfig(data=str(data), model=args.model, weights=args.weights, task=args.task, train_domain="100",
                       img_size=args.img_size, epochs=args.epochs, batch_size=args.batch_size, seed=0, bootstrap=200)
    cuda = torch.cuda.is_available()
    precision = resolve_precision(config.precision, "gpu" if cuda else "cpu", args.img_size)

    timings, evaluations = {}, {}
    for label, run, features in (("probe, embed included", "probe", out / "features"),
                                 ("probe, embed excluded", "probe_again", out / "features")):
        start = time.perf_counter()
        result = train_probe(config, out / run, ProbeSettings("linear"), features, args.img_size)
        timings[label] = time.perf_counter() - start
        evaluations[label] = result.evaluation
    start = time.perf_counter()
    finetuned = train(config, out / "finetune", progress_bar=False)
    timings["fine-tune"] = time.perf_counter() - start
    evaluations["fine-tune"] = finetuned.evaluation or json.loads((out / "finetune" / "eval" / "100.json").read_text())

    same_split = pd.read_csv(out / "probe" / "splits.csv").equals(pd.read_csv(out / "finetune" / "splits.csv"))
    split = pd.read_csv(out / "probe" / "splits.csv")
    counts = split.groupby("split")["patient_id"].agg(["size", "nunique"])
    where = torch.cuda.get_device_name(0) if cuda else f"CPU: {cpu_model()}, {torch.get_num_threads()} threads"
    print(f"{where}; torch {torch.__version__}; backbone {args.model} at {args.img_size} px, "
          f"{'weights ' + args.weights if args.weights else 'random weights'}; task {args.task}")
    print("split (same for all runs: " + ("yes" if same_split else "NO") + "): "
          + ", ".join(f"{side} {row['size']} images / {row['nunique']} patients" for side, row in counts.iterrows()))
    print(f"embed: fp32; fine-tune: {precision}, {args.epochs} epoch(s), batch {args.batch_size}")
    print(f"{'run':<26}{'wall s':>9}{'balanced acc':>14}{'fine-tune / this':>18}")
    for label, seconds in timings.items():
        balanced = evaluations[label]["balanced_accuracy"]
        print(f"{label:<26}{seconds:>9.1f}{balanced:>14.3f}{timings['fine-tune'] / seconds:>18.1f}")
    return {"timings": timings, "same_split": same_split,
            "balanced_accuracy": {label: evaluations[label]["balanced_accuracy"] for label in timings}}


if __name__ == "__main__":
    main()
