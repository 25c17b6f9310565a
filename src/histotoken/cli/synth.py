"""``histotoken synth``: write a synthetic BreakHis-style data set (for demos, tests and pipeline checks)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from histotoken.cli.common import add_command

DESCRIPTION = """\
Write a SYNTHETIC data set in the exact BreakHis folder layout and file naming:
8 subtypes, patients with BreakHis-like ids, 40X/100X/200X/400X folders, RGB PNGs.

The images are procedurally drawn H&E-like tissue, not real slides. Each subtype has
its own drawn architecture (glands, ducts, clefts, sheets, single files, mucin, fronds),
the field of view shrinks with magnification as on a microscope, and stain colour varies
per patient, so models can learn from it and cross-magnification shift is real. Use it
for demos, tests and pipeline checks. Results on it are not pathology results.

A marker file, OUT/histotoken_synthetic.json, records the parameters and marks the
folder as synthetic; every output made from it says so. Re-running the same command
completes an interrupted set and leaves a complete one untouched.

With --slides N it writes a SYNTHETIC SLIDE COHORT instead: N pyramidal TIFF slides
(lymph-node-like sections, 6144x4608 px at 1 um/px by default) in OUT/slides/, slide labels and
patient ids in OUT/slides.csv (slide,label,patient_id; every third patient has two slides), ASAP XML
annotations of every tumour slide in OUT/annotations/, and OUT/cohort.json with each slide's stage
and tumour deposits, from macro (> 2 mm) and micro (0.2-2 mm) metastasis size down to
isolated-tumour-cell-like foci (< 0.2 mm), their areas and the slide's tumour area fraction.
Ready for `histotoken tile OUT/slides/*.tif --annotations OUT/annotations --labels OUT/slides.csv`.

Examples:
  histotoken synth data/synthetic --patients-per-class 3 --size 128x96
  histotoken synth --slides 24 data/slide_cohort
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = add_command(
        subparsers,
        "synth",
        "write a synthetic BreakHis-style data set (for demos, tests, pipeline checks)",
        DESCRIPTION,
    )
    parser.add_argument(
        "out", metavar="OUT", type=Path, help="new or empty folder to write the data set into"
    )
    parser.add_argument(
        "--slides",
        type=_positive_int,
        default=None,
        metavar="N",
        help="write a cohort of N synthetic pyramidal slides (labels, patients, ASAP annotations) instead",
    )
    parser.add_argument(
        "--slide-size",
        type=parse_slide_size,
        default="6144x4608",
        metavar="WxH",
        help="with --slides: level-0 width x height in pixels at 1 um/px (default 6144x4608)",
    )
    parser.add_argument(
        "--patients-per-class",
        type=_positive_int,
        default=3,
        metavar="N",
        help="patients per subtype (default: 3); with 2 or more, one patient id appears under two subtypes, "
        "as BreakHis's 14-13412 does",
    )
    parser.add_argument(
        "--images-per-patient",
        type=_positive_int,
        default=4,
        metavar="N",
        help="images per patient and magnification (default: 4)",
    )
    parser.add_argument(
        "--magnifications",
        type=parse_magnifications,
        default="40,100,200,400",
        metavar="M,M,...",
        help="comma-separated magnifications out of 40,100,200,400 (default: all four)",
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        default="700x460",
        metavar="WxH",
        help="image width x height in pixels (default: 700x460, BreakHis's size; 128x96 is quick)",
    )
    parser.add_argument(
        "--seed", type=_non_negative_int, default=0, metavar="N", help="random seed (default: 0)"
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=min(4, _usable_cores()),
        metavar="N",
        help="processes drawing images (default: CPU cores, at most 4); the files do not depend on it",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    if args.slides is not None:
        return run_cohort(args)
    from tqdm.auto import tqdm

    from histotoken.data.synthetic import generate_synthetic_breakhis

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, initial=done - 1, unit="img", desc="synth", leave=False)
        bar.update(1)

    try:
        summary = generate_synthetic_breakhis(
            args.out,
            patients_per_class=args.patients_per_class,
            images_per_patient=args.images_per_patient,
            magnifications=args.magnifications,
            size=args.size,
            seed=args.seed,
            progress=progress,
            workers=args.workers,
        )
    finally:
        if bar is not None:
            bar.close()
    width, height = args.size
    what = (
        f"{summary.n_images} images, {summary.n_patients} patients, 8 subtypes, "
        f"magnifications {','.join(map(str, args.magnifications))}, {width}x{height} px"
    )
    if summary.created == 0:
        print(f"{summary.out} already holds this synthetic set ({what}); nothing written.")
    else:
        print(
            f"synthetic BreakHis written: {what}; {summary.created} images drawn in {summary.seconds:.1f} s"
        )
    print(
        f"data set: {summary.out.resolve()}  (synthetic: for demos, tests and pipeline checks, not pathology)"
    )
    return 0


def run_cohort(args: argparse.Namespace) -> int:
    from histotoken.data.wsi.cohort import CohortSettings, generate_cohort

    settings = CohortSettings(n_slides=args.slides, size=args.slide_size, seed=args.seed)
    summary = generate_cohort(args.out, settings, workers=args.workers)
    width, height = settings.size
    what = (f"{summary.n_slides} slides of {width}x{height} px at {settings.mpp} um/px, "
            f"{summary.n_patients} patients")
    if summary.created == 0:
        print(f"{summary.out} already holds this synthetic slide cohort ({what}); nothing written.")
    else:
        print(f"synthetic slide cohort written: {what}; {summary.created} slides drawn in {summary.seconds:.1f} s")
    print(f"cohort: {summary.out.resolve()}  (slides/, annotations/, slides.csv, cohort.json; synthetic, not pathology)")
    return 0


def parse_slide_size(text: str) -> tuple[int, int]:
    """``'6144x4608'`` -> ``(6144, 4608)``: a slide's level-0 size (3200 to 40000 px a side)."""
    return _width_height(text, 3200, 40000, "6144x4608", "--slide-size sides")


def parse_size(text: str) -> tuple[int, int]:
    """``'700x460'`` -> ``(700, 460)`` (width, height)."""
    from histotoken.data.synthetic import MAX_SIDE, MIN_SIDE

    return _width_height(text, MIN_SIDE, MAX_SIDE, "700x460", "width and height")


def _width_height(text: str, low: int, high: int, example: str, what: str) -> tuple[int, int]:
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels such as {example}, got {text!r}")
    width, height = (int(part) for part in parts)
    if min(width, height) < low or max(width, height) > high:
        raise argparse.ArgumentTypeError(f"{what} must be from {low} to {high} pixels, got {text!r}")
    return width, height


def parse_magnifications(text: str) -> list[int]:
    """``'40,400'`` (an ``X`` suffix is accepted: ``'40X,400X'``) -> ``[40, 400]``."""
    from histotoken.data.breakhis import MAGNIFICATIONS

    allowed = ",".join(map(str, MAGNIFICATIONS))
    values = []
    for part in text.split(","):
        part = part.strip().upper().removesuffix("X")
        if not part.isdigit() or int(part) not in MAGNIFICATIONS:
            raise argparse.ArgumentTypeError(
                f"magnifications must be a comma-separated subset of {allowed}, got {text!r}"
            )
        values.append(int(part))
    return sorted(set(values))


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _non_negative_int(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours CPU pinning and container limits where set
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1
