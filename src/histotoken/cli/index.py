"""histotoken index: what is in a BreakHis folder."""

from __future__ import annotations

from histotoken.cli.common import add_command, add_data_options

DESCRIPTION = """\
Scan a BreakHis folder and list its images: one row per image with path, patient_id,
tumor_class (8 subtypes), label (benign/malignant) and magnification. Prints images per
class x magnification and patients per class. Files that are not readable images or whose
names do not follow the BreakHis pattern are listed with the reason and left out.
Nothing is written into DATA_ROOT (it may be read-only); the index is cached elsewhere.

DATA_ROOT may be the folder that holds BreaKHis_v1, or any folder below it down to 'breast'.

Example:
  histotoken index ~/data/BreaKHis --out breakhis_index.csv
"""


def add_parser(subparsers):
    parser = add_command(subparsers, "index", "list the images of a BreakHis folder", DESCRIPTION)
    parser.add_argument("data_root", metavar="DATA_ROOT", help="BreakHis, ImageFolder, CIFAR-10 binary or tiles folder")
    parser.add_argument("--out", metavar="CSV", help="also write the index to this CSV file")
    parser.add_argument("--refresh", action="store_true", help="re-scan even if a cached index is up to date")
    add_data_options(parser)
    return parser


def run(args) -> int:
    from histotoken.data.breakhis import counts_table, is_synthetic
    from histotoken.data.index import load_index
    from histotoken.io import atomic_write_text

    result = load_index(args.data_root, refresh=args.refresh, data_format=args.data_format or "auto", groups=args.groups)
    frame = result.frame
    if is_synthetic(args.data_root):
        print("Note: this is a SYNTHETIC data set made by `histotoken synth` (not real tissue).")
    print(f"{len(frame)} images, {frame['patient_id'].nunique()} patients in {args.data_root}\n")
    if result.data_format == "breakhis":
        print(counts_table(frame).to_string())
    else:
        print(f"{result.data_format}: images per class\n{frame['label'].value_counts().sort_index().to_string()}")
    if result.skipped:
        print(f"\n{len(result.skipped)} files left out:")
        for path, reason in result.skipped:
            print(f"  {path}: {reason}")
    if args.out:
        atomic_write_text(args.out, frame.to_csv(index=False))
        print(f"\nindex written to {args.out}")
    return 0
