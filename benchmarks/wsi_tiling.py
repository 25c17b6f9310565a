"""Whole-slide tiling speed: tissue detection, tiling, and tile reads from the pyramid versus level 0.

Generates one synthetic pyramidal TIFF (``--size`` pixels square at 0.25 mpp, 256 px tiles; JPEG tiles as in
scanner files when the imagecodecs package is installed (tifffile encodes JPEG with it), deflate otherwise:
deflate tiles of noisy texture are slower to decode, so reads are then a pessimistic figure) with tissue ellipses,
a tumour region with an ASAP XML outline and a pen stroke, then measures, side by side:

- tissue detection (open the slide, read it at 8 um per pixel, glass-relative density + clean-up), median of
  ``--repeats``;
- tiling (``histotoken tile``'s per-slide work: tissue, grid, tumour fractions, thumbnail, table);
- tiles per second reading the kept 224 px tiles at 0.5 mpp (in grid order, as prediction reads them, and
  shuffled, as training reads them; in grid order also with OpenSlide's default 32 MiB cache per slide
  instead of the tile dataset's 256 MiB per process, ``HISTOTOKEN_SLIDE_CACHE_MB``) with 1 and
  2 DataLoader worker processes (the second of two passes: workers started, slide open, file in the OS cache), from the best pyramid level (level 1 here: a 224 px read, no resize)
  and naively from level 0 (a 448 px read, resized to 224).

Goals on a 2-core machine: tissue detection under 5 s per slide, at least 500 tiles/s with 2 workers.

    python benchmarks/wsi_tiling.py                 # 40,960 px slide (generated once into --work-dir)
    python benchmarks/wsi_tiling.py --size 8192     # a quick check that it runs

With ``--real-slides FILE ...`` it instead reports, per real slide (files kept out of git, e.g. OpenSlide's
CMU-1-Small-Region.svs): its size, the mask resolution and level, the tissue fraction found, the agreement
(IoU, Dice) of the mask with a second method (Li's threshold on the optical density) and the seconds taken.

    python benchmarks/wsi_tiling.py --real-slides /work/realdata/*.svs --slide-mpp 2.0
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from histotoken import formats
from histotoken.data.wsi.dataset import TileDataset
from histotoken.data.wsi.reader import Resolution, open_slide
from histotoken.data.wsi.synthetic import Shape, write_slide
from histotoken.data.wsi.tiling import SlideJob, TilingSettings, tile_one_slide
from histotoken.data.wsi.tissue import agreement, detect_tissue, li_density_mask

PINK, PURPLE, BLUE_PEN = (230, 150, 200), (120, 60, 160), (30, 60, 200)


def layout(size: int) -> tuple[list[Shape], tuple[float, float, float, float]]:
    """Tissue ellipses and a band covering about a third of the slide, a tumour, a pen stroke."""
    s = float(size)
    tumour = (0.24 * s, 0.30 * s, 0.36 * s, 0.40 * s)
    shapes = [
        Shape("ellipse", (0.08 * s, 0.17 * s, 0.52 * s, 0.53 * s), PINK),
        Shape("ellipse", (0.48 * s, 0.35 * s, 0.88 * s, 0.85 * s), PINK),
        Shape("rect", (0.10 * s, 0.70 * s, 0.45 * s, 0.85 * s), PINK),
        Shape("ellipse", tumour, PURPLE),
        Shape("line", (0.05 * s, 0.95 * s, 0.90 * s, 0.92 * s), BLUE_PEN, width=0.004 * s, noise=4),
    ]
    return shapes, tumour


def write_asap(path: Path, box: tuple[float, float, float, float], points: int = 64) -> Path:
    """An ASAP XML outline (group _0) of the tumour ellipse."""
    cx, cy, rx, ry = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    coordinates = "".join(f'<Coordinate Order="{i}" X="{cx + rx * np.cos(a):.1f}" Y="{cy + ry * np.sin(a):.1f}" />'
                          for i, a in enumerate(angles))
    path.write_text('<ASAP_Annotations><Annotations><Annotation Name="t" Type="Polygon" PartOfGroup="_0">'
                    f"<Coordinates>{coordinates}</Coordinates></Annotation></Annotations></ASAP_Annotations>")
    return path


def tiles_per_second(table: pd.DataFrame, workers: int, batch_size: int = 64) -> float:
    """Tiles read per second through a TileDataset and a DataLoader with ``workers`` processes.

    A first pass starts the workers and opens the slide in each; the second pass is timed.
    """
    loader = DataLoader(TileDataset(table, formats.TILE_CLASS_NAMES), batch_size=batch_size, num_workers=workers,
                        persistent_workers=True)
    for _ in loader:
        pass
    start = time.perf_counter()
    count = sum(len(images) for images, _ in loader)
    return count / (time.perf_counter() - start)


def real_slide_report(paths: list[Path], slide_mpp: float | None) -> pd.DataFrame:
    """One row per real slide: size, mask resolution, tissue fraction, agreement with the second method, time."""
    rows = []
    for path in paths:
        start = time.perf_counter()
        with open_slide(path, slide_mpp) as slide:
            tissue = detect_tissue(slide)
            seconds = time.perf_counter() - start
            mask_mpp = slide.mpp * tissue.scale[0]
            second = li_density_mask(tissue.image, mask_mpp)
            match = agreement(tissue.mask, second)
            rows.append({
                "slide": path.name, "bytes": path.stat().st_size, "level0": "x".join(map(str, slide.dimensions)),
                "levels": slide.level_count, "mpp": round(slide.mpp, 3), "mask_um_px": round(mask_mpp, 2),
                "mask_level": tissue.level, "tissue_fraction": round(tissue.tissue_fraction, 3),
                "second_method_fraction": round(float(second.mean()), 3), "iou": round(match["iou"], 3),
                "dice": round(match["dice"], 3), "seconds": round(seconds, 2),
            })
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=40960, help="level-0 side in pixels (at least 40,000 for the goal)")
    parser.add_argument("--work-dir", type=Path, help="where the slide is generated (kept; reused when present)")
    parser.add_argument("--max-tiles", type=int, default=4000, help="tiles read per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compression", choices=("auto", "jpeg", "zlib"), default="auto",
                        help="tile compression of the generated slide (auto: jpeg when imagecodecs is installed)")
    parser.add_argument("--real-slides", type=Path, nargs="+", help="report tissue detection on these slides instead")
    parser.add_argument("--slide-mpp", type=float, help="level-0 mpp for real slides that record none")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.real_slides:
        print(real_slide_report(args.real_slides, args.slide_mpp).to_string(index=False))
        return

    work = args.work_dir or Path(tempfile.gettempdir()) / "histotoken_wsi_benchmark"
    work.mkdir(parents=True, exist_ok=True)
    compression = args.compression
    if compression == "auto":
        import importlib.util

        compression = "jpeg" if importlib.util.find_spec("imagecodecs") else "zlib"
    slide_path = work / f"synthetic_{args.size}_{compression}.tif"
    shapes, tumour = layout(args.size)
    if not slide_path.exists():
        start = time.perf_counter()
        partial = slide_path.with_suffix(".partial.tif")
        write_slide(partial, shapes, (args.size, args.size), mpp=0.25, compression=compression)
        partial.replace(slide_path)
        print(f"generated {slide_path} ({slide_path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.0f} s")
    annotation = write_asap(work / f"{slide_path.stem}.xml", tumour)

    settings = TilingSettings(tile_size=224, resolution=Resolution(0.5, "mpp"))
    detection = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        with open_slide(slide_path) as slide:
            tissue = detect_tissue(slide, settings.tissue)
        detection.append(time.perf_counter() - start)
    tiling = []
    for _ in range(args.repeats):
        out = Path(tempfile.mkdtemp(prefix="tiles", dir=work))
        start = time.perf_counter()
        record = tile_one_slide(SlideJob(slide_path, annotation), settings, out)
        tiling.append(time.perf_counter() - start)
        if record["status"] != "done":
            raise SystemExit(f"tiling failed: {record['error']}")
    table = pd.read_parquet(formats.TilePaths(out).table(slide_path.stem))
    in_order = table.iloc[: args.max_tiles].reset_index(drop=True)  # grid order (row by row)
    shuffled = in_order.sample(frac=1.0, random_state=0).reset_index(drop=True)
    size0 = settings.tile_size * 0.5 / 0.25
    naive = in_order.assign(level=0, read_size=int(round(size0)))

    frames = {"pyramid": in_order, "shuffled": shuffled, "naive": naive}
    rates = {(kind, w): tiles_per_second(frame, w) for kind, frame in frames.items() for w in (1, 2)}
    # side by side: the same grid-order reads with OpenSlide's default cache (32 MiB per slide) instead
    # of the 256 MiB per-process cache the tile dataset sets (workers fork after this, and inherit it)
    from histotoken.data.wsi import dataset as tile_dataset

    chosen, tile_dataset.SLIDE_CACHE_MB = tile_dataset.SLIDE_CACHE_MB, 0
    rates.update({("default cache", w): tiles_per_second(in_order, w) for w in (1, 2)})
    tile_dataset.SLIDE_CACHE_MB = chosen
    with open_slide(slide_path) as slide:
        levels = ", ".join(f"{w}x{h}" for w, h in slide.level_dimensions)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}")
    print(f"slide: {args.size} x {args.size} px at 0.25 mpp, {compression} tiles, levels {levels}; mask level {tissue.level} "
          f"({tissue.mask.shape[1]}x{tissue.mask.shape[0]}), {tissue.mask.mean():.0%} tissue")
    print(f"tiles: {len(table)} kept of the 224 px / 0.5 mpp grid ({int((table['label'] == 'tumor').sum())} tumour); "
          f"reads measured on {len(in_order)} tiles")
    rows = [
        ("tissue detection (s, median)", f"{statistics.median(detection):.2f}", "-", "-", "-"),
        ("tiling one slide (s, median)", f"{statistics.median(tiling):.2f}", "-", "-", "-"),
        *[(f"tiles/s, {w} worker{'s' if w > 1 else ''}", f"{rates[('pyramid', w)]:.0f}",
           f"{rates[('shuffled', w)]:.0f}", f"{rates[('default cache', w)]:.0f}", f"{rates[('naive', w)]:.0f}")
          for w in (1, 2)],
    ]
    level = int(table["level"].iloc[0])
    columns = ["measure", f"best level ({level}), grid order", f"best level ({level}), shuffled",
               "grid order, OpenSlide's default cache", "naive (level 0 + resize), grid order"]
    print(pd.DataFrame(rows, columns=columns).to_string(index=False))
    print(f"goals: tissue detection < 5 s: {'met' if statistics.median(detection) < 5 else 'NOT met'}; "
          f">= 500 tiles/s with 2 workers: {'met' if rates[('pyramid', 2)] >= 500 else 'NOT met'}")


if __name__ == "__main__":
    main()
