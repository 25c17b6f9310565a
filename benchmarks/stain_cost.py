"""Cost of stain normalisation per image when the decoded store is built, next to decode + resize.

Stain normalisation (``--stain-norm``) runs once per image, when the store is built, on the image
already decoded and resized to the model's input size; it costs nothing per epoch. HED jitter
(``--stain-augment hed``) runs in every training epoch and is measured too. Synthetic BreakHis-size
PNGs (700x460, procedurally drawn H&E) are written to a temporary folder; every step is measured
in turns over several rounds (torch.utils.benchmark.Timer) and the median per image is printed.

    python benchmarks/stain_cost.py                            # 32 images at 224 px, 5 rounds
    python benchmarks/stain_cost.py --images 2 --rounds 1 --img-size 32 --width 96 --height 64   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

from histotoken.data.dataset import load_image
from histotoken.data.stain import make_stain_normaliser
from histotoken.data.synthetic import SUBTYPES, render_image
from histotoken.data.transforms import RandomHEDJitter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="synthetic images to process (default: 32)")
    parser.add_argument("--img-size", type=int, default=224, help="store image side in pixels (default: 224)")
    parser.add_argument("--width", type=int, default=700, help="source PNG width (default: 700, as BreakHis)")
    parser.add_argument("--height", type=int, default=460, help="source PNG height (default: 460)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds (default: 5)")
    parser.add_argument("--methods", nargs="+", default=["macenko", "reinhard"], help="stain normalisations")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def write_images(folder: Path, count: int, size: tuple[int, int]) -> list[str]:
    """``count`` synthetic H&E PNGs of different subtypes and patients (so stains differ)."""
    from torchvision.io import write_png

    paths = []
    for index in range(count):
        rgb = render_image(SUBTYPES[index % len(SUBTYPES)], 100, size, 0, index, f"14-{10000 + index}", 1)
        path = folder / f"image_{index:04d}.png"
        write_png(torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), str(path))
        paths.append(str(path))
    return paths


def per_image_ms(step: Callable[[], None], count: int) -> float:
    """One pass of ``step`` over all images, in milliseconds per image."""
    return Timer(stmt="step()", globals={"step": step}).timeit(1).mean * 1000 / count


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from histotoken.engine.benchmark import machine_description

    with tempfile.TemporaryDirectory(prefix="histotoken-stain-") as folder:
        paths = write_images(Path(folder), args.images, (args.width, args.height))
        resized = [load_image(path, args.img_size) for path in paths]
        normalisers = {method: make_stain_normaliser(method, paths[0])[0] for method in args.methods}
        hed = RandomHEDJitter()
        steps: dict[str, Callable[[], None]] = {
            f"decode + resize ({args.width}x{args.height} PNG -> {args.img_size} px)":
                lambda: [load_image(path, args.img_size) for path in paths],
        }
        for method, normaliser in normalisers.items():
            steps[f"{method} normalisation ({args.img_size} px, once per image)"] = (
                lambda normaliser=normaliser: [
                    normaliser.normalise_or_keep(image, path) for image, path in zip(resized, paths)
                ]
            )
        steps[f"HED jitter ({args.img_size} px, every epoch)"] = lambda: [hed(image) for image in resized]
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.rounds):  # interleaved: every step once per round
            for name, step in steps.items():
                times[name].append(per_image_ms(step, len(paths)))

    machine = machine_description()
    print(f"machine: {machine['cpu']}, {machine['torch_threads']} torch threads, fp32 (no autocast)")
    print(f"{args.images} synthetic images, {args.rounds} rounds, medians\n")
    decode = statistics.median(next(iter(times.values())))
    print("| step | ms/image | x decode+resize |")
    print("|---|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {median / decode:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
