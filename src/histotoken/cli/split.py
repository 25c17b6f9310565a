"""histotoken split: patient-disjoint train/val/test splits."""

from __future__ import annotations

from histotoken.cli.common import add_command, add_data_options

DESCRIPTION = """\
Make a train/val/test split of a BreakHis folder and write it as CSV (path, patient_id,
tumor_class, label, magnification, split). A run freezes the split it used.

By default whole patients go to one side, stratified by tumour subtype, across all
magnifications: a test patient's images at every magnification are test images. BreakHis
patient 14-13412 appears under two subtypes; it stays on one side.

--scheme image splits images at random. Images of one patient then land in train and test
(often near-identical fields of view), which inflates scores; use it only to reproduce
published protocols that did this. The file then records the scheme (column scheme=image); a
split file without it that puts a patient on two sides is refused by train and evaluate.
A class that gets no validation or no test patients is warned about.

Examples:
  histotoken split ~/data/BreaKHis --out splits.csv --seed 1
  histotoken split ~/data/BreaKHis --out fold2.csv --folds 5 --fold 2
"""


def add_parser(subparsers):
    parser = add_command(subparsers, "split", "make a patient-disjoint split (CSV)", DESCRIPTION)
    parser.add_argument("data_root", metavar="DATA_ROOT", help="BreakHis, ImageFolder, CIFAR-10 binary or tiles folder")
    parser.add_argument("--out", required=True, metavar="CSV", help="where to write the split")
    parser.add_argument("--scheme", choices=["patient", "image"], default="patient", help="patient (default) or image (leaky)")
    parser.add_argument("--val", type=float, default=0.15, help="fraction of patients for validation (default 0.15)")
    parser.add_argument("--test", type=float, default=0.15, help="fraction of patients for test (default 0.15)")
    parser.add_argument("--folds", type=int, metavar="K", help="K-fold cross-validation over patients")
    parser.add_argument("--fold", type=int, default=0, metavar="I", help="which fold is the test set (0..K-1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_data_options(parser)
    return parser


def run(args) -> int:
    from histotoken.data.index import load_index
    from histotoken.data.splits import (
        IMAGE_SCHEME_WARNING,
        empty_side_warnings,
        make_split,
        split_summary,
        write_split,
    )

    result = load_index(args.data_root, data_format=args.data_format or "auto", groups=args.groups)
    split = make_split(result.frame, args.scheme, args.val, args.test, args.folds, args.fold, args.seed)
    if not result.grouped:
        from histotoken.data.index import warn_ungrouped

        print(f"WARNING: {warn_ungrouped(args.data_root)}")
    if args.scheme == "image":
        print(f"WARNING: {IMAGE_SCHEME_WARNING}")
    for warning in empty_side_warnings(split):
        print(f"WARNING: {warning}")
    print(split_summary(split).to_string())
    counts = split.groupby("split")["patient_id"].nunique()
    print("\npatients per side: " + ", ".join(f"{side} {counts.get(side, 0)}" for side in ("train", "val", "test")))
    write_split(split, args.out)
    print(f"split written to {args.out}")
    return 0
