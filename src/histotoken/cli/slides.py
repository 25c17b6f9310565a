"""histotoken slides: train and evaluate slide classifiers on per-slide tile features (multiple-instance learning)."""

from __future__ import annotations

import argparse
import json

from histotoken.cli.common import add_command

AGGREGATOR_NAMES = ("mean", "max", "abmil", "clam_sb", "transmil", "tokenlearner", "token_merging", "topk")

DESCRIPTION = """\
Slide classifiers that learn from tile tokens: per-slide feature files (FEATURES/<slide>.h5 with
`features` N x D and `coords` N x 2, as `histotoken embed` writes them) and a labels CSV (slide,label
and optionally patient_id; CAMELYON16 reference.csv and CAMELYON17 stage CSVs work as they are).

  train     split the slides by patient, fit one aggregator, evaluate it on the test patients
  evaluate  evaluate a trained run again (optionally on another copy of the features)
  demo      the slide study on a SYNTHETIC cohort, in one command: synth --slides -> tile -> embed ->
            several aggregators -> DIR/report.html (configs/slides_demo.yaml; about 2-3 minutes on 2 CPU cores)

Aggregators: mean, max, abmil (gated attention), clam_sb, transmil (exact attention instead of
Nystrom), tokenlearner (learned slots), token_merging (ToMe inside a transformer), topk (learned
tile pruning). The run folder holds config.json, split.csv, model.safetensors, metrics.json,
eval.json (AUROC, balanced accuracy, macro-F1 with 95% intervals over test patients; cost per slide),
predictions.csv, importance/<slide>.csv (x, y, importance per tile) and heatmaps/<slide>.png (the
importance over the slide's thumbnail, with a colour bar; skipped with a warning when the slide file
is gone). See docs/mil.md.

Examples:
  histotoken slides train --features features/ --labels slides.csv --aggregator abmil --out runs/abmil
  histotoken slides train --features features/ --labels slides.csv --aggregator topk --param k=32 --out runs/topk
  histotoken slides evaluate runs/abmil
  histotoken slides demo --out slides_demo          # then open slides_demo/report.html
"""


def _parse_param(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param takes NAME=VALUE (e.g. k=32), got {text!r}")
    name, value = text.split("=", 1)
    try:
        return name.strip(), json.loads(value)
    except json.JSONDecodeError:
        return name.strip(), value


def add_parser(subparsers):
    parser = add_command(subparsers, "slides", "train/evaluate slide classifiers on tile features (MIL)", DESCRIPTION)
    actions = parser.add_subparsers(dest="slides_command", metavar="ACTION", required=True)
    train = actions.add_parser("train", help="split by patient, fit an aggregator, evaluate on the test patients")
    train.add_argument("--features", required=True, metavar="FEATURES", help="folder of <slide>.h5 feature files")
    train.add_argument("--labels", required=True, metavar="CSV", help="slide,label[,patient_id] CSV")
    train.add_argument("--aggregator", required=True, choices=AGGREGATOR_NAMES)
    train.add_argument("--param", action="append", type=_parse_param, default=[], metavar="NAME=VALUE",
                       help="aggregator option, repeatable (e.g. k=32, num_slots=8, r=16, dim=128)")
    train.add_argument("--out", required=True, metavar="RUN_DIR")
    train.add_argument("--epochs", type=int, default=20)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--test-fraction", type=float, default=0.25, help="share of patients in the test set")
    train.add_argument("--train-max-tiles", type=int, default=8192,
                       help="tiles drawn per slide per training step (bounds memory)")
    train.add_argument("--chunk-size", type=int, default=4096,
                       help="tiles read at a time when evaluating mean/max/abmil/clam_sb")
    train.add_argument("--bootstrap", type=int, default=1000, help="resamples of test patients for the intervals")
    evaluate = actions.add_parser("evaluate", help="evaluate a trained run on its test patients again")
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `histotoken slides train`")
    evaluate.add_argument("--features", metavar="FEATURES", help="read the feature files from here instead")
    demo = actions.add_parser(
        "demo", help="synthetic slide cohort -> tile -> embed -> several aggregators -> report.html",
        description="Run the slide study of configs/slides_demo.yaml on a SYNTHETIC cohort (drawn slides, features "
                    "from a backbone with random weights): DIR/cohort, DIR/tiles, DIR/features, DIR/runs/<aggregator>, "
                    "DIR/report.html. Re-running resumes: finished steps are skipped.")
    demo.add_argument("--out", default="slides_demo", metavar="DIR", help="output folder (default slides_demo)")
    demo.add_argument("--config", metavar="YAML", help="another slide study file (default: the shipped slides_demo.yaml)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                      help="change one setting, repeatable (e.g. --set cohort.slides=12 --set fit.epochs=5)")
    return parser


def _print_result(result: dict, run_dir: str) -> None:
    def interval(name: str) -> str:
        bounds = result.get(f"{name}_ci95")
        return f" [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else ""

    auroc = "n/a" if result["auroc"] is None else f"{result['auroc']:.3f}"
    cost = result["cost"]
    print(f"{result['aggregator']}: AUROC {auroc}{interval('auroc')}, balanced accuracy "
          f"{result['balanced_accuracy']:.3f}{interval('balanced_accuracy')}, macro-F1 "
          f"{result['macro_f1']:.3f}{interval('macro_f1')} ({result['n_slides']} test slides, "
          f"{result['n_patients']} patients)")
    print(f"cost per slide: {cost['tokens_in_mean']:.0f} tokens in, {cost['tokens_kept_mean']:.0f} kept, "
          f"{cost['ms_per_slide_mean']:.1f} ms, peak memory {cost['peak_memory_mb_max']:.1f} MB")
    for note in result.get("notes") or []:
        print(f"  NOTE: {note}")
    print(f"written to {run_dir}/eval.json")


def run(args) -> int:
    from histotoken.mil.train import FitConfig, evaluate_run, train_run

    if args.slides_command == "demo":
        return run_demo(args)
    if args.slides_command == "train":
        fit = FitConfig(epochs=args.epochs, lr=args.lr, seed=args.seed, train_max_tiles=args.train_max_tiles)
        result = train_run(args.features, args.labels, args.aggregator, args.out, fit, args.test_fraction,
                           args.chunk_size, args.bootstrap, dict(args.param))
        _print_result(result, args.out)
    else:
        result = evaluate_run(args.run_dir, args.features)
        _print_result(result, args.run_dir)
    return 0


def run_demo(args) -> int:
    import time

    from histotoken.experiments.slides_demo import load_config, run_slides_demo

    config = load_config(args.config, args.overrides)
    start = time.perf_counter()

    def on_step(name: str, info: dict) -> None:
        state = "reused" if info.get("reused") else f"{info['seconds']:.1f} s"
        print(f"  {name}: {state}", flush=True)

    print(f"slide study {config['name']} (synthetic cohort of {config['cohort']['slides']} slides) in {args.out}")
    report = run_slides_demo(args.out, config, on_step)
    print(f"done in {time.perf_counter() - start:.0f} s; report: {report}")
    return 0
