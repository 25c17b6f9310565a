"""histotoken evaluate: test a trained run on a (possibly different) magnification."""

from __future__ import annotations

from histotoken.cli.common import EPILOG_DOMAINS, add_command

DESCRIPTION = f"""\
Evaluate a run's best checkpoint on the test patients of its frozen split, at the
magnification(s) you name: the train domain (in-domain) or another one (cross-domain).
Writes RUN_DIR/eval/<domain>.json with accuracy, balanced accuracy, macro-F1, per-class
precision/recall/F1, the confusion matrix, patient-level accuracy (the BreakHis patient
recognition rate), 95% bootstrap intervals over test patients (drawn within each class
when every class has two or more) and notes on what the numbers cannot support (fewer than
5 test patients of a class, degenerate intervals); the notes are printed too.
{EPILOG_DOMAINS}

Examples:
  histotoken evaluate runs/r18_100 --domain 400
  histotoken evaluate runs/r18_100 --domain all --data /mnt/other/copy/of/BreaKHis
  histotoken evaluate runs/deit_100 --domain 100 --merge-r 8   # token merging on a trained DeiT
"""


def add_parser(subparsers):
    parser = add_command(subparsers, "evaluate", "test a run on a domain (writes eval/<domain>.json)", DESCRIPTION)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `histotoken train`")
    parser.add_argument("--domain", required=True, action="append", help="test domain; repeat for several")
    parser.add_argument("--data", metavar="DATA_ROOT", help="read images from this copy of the data set instead")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of test patients for the 95%% intervals (0: no intervals)")
    parser.add_argument(
        "--merge-r", type=int, metavar="N",
        help="apply token merging (ViT/DeiT) at test time, N tokens per block; written to eval/<domain>__merge_rN.json",
    )
    return parser


def run(args) -> int:
    from pathlib import Path

    from histotoken.engine.evaluate import eval_path, evaluate_run
    from histotoken.engine.run_lock import run_lock

    probe = _is_probe_run(Path(args.run_dir))
    if probe and (args.merge_r or args.data):
        raise ValueError(f"{args.run_dir} is a linear-probe run (train --probe): --merge-r and --data do not apply; "
                         "run `histotoken embed` on the other data and train a probe on it instead")
    for domain in args.domain:
        with run_lock(args.run_dir, "evaluate"):  # one writer per run folder
            if probe:  # refits the probe on its cached features (seconds), then tests it
                from histotoken.features.probe import evaluate_probe

                result = evaluate_probe(args.run_dir, domain, args.bootstrap)
            else:
                result = evaluate_run(args.run_dir, domain, args.data, args.batch_size, args.bootstrap, args.merge_r)
        interval = ""
        if result["ci95"]:
            lo, hi = result["ci95"]["macro_f1"]
            interval = f" [{lo:.3f}, {hi:.3f}]"
        print(
            f"{result['domain']}: macro-F1 {result['macro_f1']:.3f}{interval}, accuracy "
            f"{result['accuracy']:.3f}, balanced accuracy {result['balanced_accuracy']:.3f}, patient accuracy "
            f"{result['patient_accuracy']:.3f} ({result['n_images']} images, {result['n_patients']} patients)"
        )
        for note in result.get("notes") or []:
            print(f"  NOTE: {note}")
        print(f"written to {eval_path(Path(args.run_dir), domain, args.merge_r, result['trained_merge_r'])}")
    return 0


def _is_probe_run(run_dir) -> bool:
    """Whether the run's config.yaml records a probe on frozen features (``train --probe``)."""
    import yaml

    from histotoken.formats import RunPaths

    config = RunPaths(run_dir).config
    recorded = yaml.safe_load(config.read_text()) if config.is_file() else None
    return isinstance(recorded, dict) and bool(recorded.get("probe"))
