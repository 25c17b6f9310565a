"""``histotoken tile``: cut whole-slide images into tissue tiles (coordinates, labels, thumbnails)."""

from __future__ import annotations

import argparse

from histotoken.cli.common import add_command

DESCRIPTION = """\
Cut whole-slide images (.svs, .tif/.tiff, .ndpi, .mrxs: anything OpenSlide reads) into square tiles at
a physical resolution, keeping tiles with enough tissue. Tiles are stored as coordinates, one table per
slide (TILES_DIR/tiles/<slide>.parquet); pixels are read from the slides when training.

Per slide: tissue is found at 8 microns per pixel, whatever levels the slide has (optical density and
saturation against the slide's own glass colour, so pale stroma counts; large blue, green and black pen
marks do not), the tile grid is laid at the target mpp and read from the best pyramid level, each tile gets
its tissue fraction, tumour fraction (from ASAP XML or QuPath GeoJSON annotations) and label, and
TILES_DIR/thumbnails/<slide>.png shows the tissue contour and the kept tiles. TILES_DIR/summary.csv has one
row per slide, with its tissue fraction; a slide keeping under 5 tiles or 1% tissue is flagged. Slides run in
parallel (--workers; workers stop when the command is killed); a finished slide is skipped when the command
is run again, and a slide that cannot be read (unreadable tile data, a size its file cannot hold, a broken
annotation file) is reported in one line while the others go on.

Labels: --annotations DIR holds <slide>.xml (CAMELYON16 ASAP: groups _0/_1 tumour, _2 exclusion) or
<slide>.geojson (QuPath; class names mapped with --label-map). --labels CSV gives slide labels
(CAMELYON16 reference format: slide,label) and optionally a patient_id column; otherwise CAMELYON17 names
patient_XXX_node_Y give the patient. Slides labelled normal without annotations have all tiles normal.

Examples:
  histotoken tile slides/*.tif --out tiles --annotations lesion_annotations --labels reference.csv
  histotoken tile slides/*.svs --out tiles20x --magnification 20 --tile-size 256 --workers 2
  histotoken train --data tiles --model resnet18 --out runs/r18_tiles
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = add_command(subparsers, "tile", "cut whole-slide images into tissue tiles (coordinates + labels)",
                         DESCRIPTION)
    parser.add_argument("slides", metavar="SLIDES", nargs="+", help="slide files")
    parser.add_argument("--out", metavar="TILES_DIR", required=True, help="tile folder to write (or resume)")
    parser.add_argument("--tile-size", type=int, default=224, help="tile side in pixels at the target resolution")
    resolution = parser.add_mutually_exclusive_group()
    resolution.add_argument("--mpp", type=float, help="target microns per pixel (default 0.5)")
    resolution.add_argument("--magnification", type=float, help="target objective power, e.g. 20 (instead of --mpp)")
    parser.add_argument("--overlap", type=int, default=0, help="pixels shared by neighbouring tiles")
    parser.add_argument("--tissue-threshold", type=float, default=0.5, help="keep tiles with at least this tissue fraction")
    parser.add_argument("--annotations", metavar="DIR", help="folder of <slide>.xml (ASAP) or <slide>.geojson (QuPath)")
    parser.add_argument("--labels", metavar="CSV", help="slide labels: slide,label[,patient_id]")
    parser.add_argument("--label-map", metavar="NAME=LABEL,...",
                        help="QuPath class names to tumor/exclude, e.g. Tumor=tumor,Ignore=exclude")
    parser.add_argument("--min-tumor-fraction", type=float, default=0.5,
                        help="a tile is tumour when this share of it lies in tumour polygons")
    parser.add_argument("--slide-mpp", type=float, help="level-0 microns per pixel for slides that record none")
    parser.add_argument("--workers", type=int, default=1, help="slides tiled in parallel processes")
    return parser


def settings_from_args(args):
    """TilingSettings from the shared tiling options (also used by ``predict`` for slides)."""
    from histotoken.data.wsi.reader import Resolution
    from histotoken.data.wsi.tiling import TilingSettings

    if getattr(args, "magnification", None):
        resolution = Resolution(args.magnification, "power")
    else:
        resolution = Resolution(args.mpp or 0.5, "mpp")
    return TilingSettings(tile_size=args.tile_size, resolution=resolution, overlap=args.overlap,
                          tissue_threshold=args.tissue_threshold, min_tumor_fraction=args.min_tumor_fraction)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from histotoken.data.wsi.annotations import parse_label_map
    from histotoken.data.wsi.tiling import slide_jobs, tile_slides
    from histotoken.formats import TilePaths

    settings = settings_from_args(args)
    jobs = slide_jobs(args.slides, args.annotations, args.labels, parse_label_map(args.label_map), args.slide_mpp)
    summary = tile_slides(jobs, args.out, settings, workers=args.workers)
    names = {job.name for job in jobs}
    mine = summary[summary["slide"].isin(names)]
    done = mine[mine["status"] == "done"]
    failed = mine[mine["status"] != "done"]
    print(f"{len(done)} of {len(jobs)} slides tiled: {int(done['n_tiles'].sum())} tiles "
          f"({int(done['n_tumor_tiles'].sum())} tumour) at {settings.resolution}, {settings.tile_size} px")
    for _, row in failed.iterrows():
        print(f"failed: {row['error']}")
    paths = TilePaths(Path(args.out))
    print(f"written to {paths.root} (tiles/, thumbnails/, {paths.summary.name})")
    return 1 if len(failed) else 0
