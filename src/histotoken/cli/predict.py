"""histotoken predict: class probabilities of a trained run for image files and folders."""

from __future__ import annotations

from histotoken.cli.common import add_command

DESCRIPTION = """\
Score image files (png, jpg, jpeg, tif, tiff, bmp) or folders of them (searched recursively) with a
run's best checkpoint. Each image is decoded and resized to the run's input size as in training and
scored with the run's accelerator and precision. Writes a CSV: path, predicted_class, one
prob/<class> column per class, and error (an unreadable image gets its error instead of a crash).
--tta averages the softmax over 8 views (4 right-angle rotations x horizontal flip).
Whole-slide files (.svs, .ndpi, .mrxs, pyramidal .tif) are tiled and scored per slide instead;
their outputs go to the --out folder (or beside the CSV, in a folder of the same name).

Examples:
  histotoken predict runs/r18_100 new_images/ --out predictions.csv
  histotoken predict runs/r18_100 a.png b.png --tta
  histotoken predict runs/wsi slides/ --out slide_predictions --export-annotations geojson --export-regions
"""


def add_parser(subparsers):
    parser = add_command(subparsers, "predict", "predict classes of images (writes a CSV)", DESCRIPTION)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `histotoken train`")
    parser.add_argument("paths", metavar="PATHS", nargs="+", help="image files or folders")
    parser.add_argument(
        "--out", default="predictions.csv", metavar="FILE.csv|DIR",
        help="CSV file for image predictions, or a folder (then DIR/predictions.csv) (default: predictions.csv)",
    )
    parser.add_argument("--tta", action="store_true", help="average over 8 flips/rotations of each image")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--accelerator", help="override the run's accelerator (cpu, gpu)")
    slides = parser.add_argument_group("whole-slide images (tiled with the run's own tiling when it was trained on tiles)")
    slides.add_argument("--annotations", metavar="DIR", help="<slide>.xml (ASAP) or <slide>.geojson: tile labels, heatmap outlines")
    slides.add_argument("--labels", metavar="CSV", help="slide labels (slide,label): slide- and tile-level metrics in eval.json")
    slides.add_argument("--label-map", metavar="NAME=LABEL,...", help="QuPath class names to tumor/exclude")
    slides.add_argument("--slide-mpp", type=float, help="level-0 microns per pixel for slides that record none")
    slides.add_argument("--top-k", type=int, default=10, help="slide score: mean of the k highest tile probabilities")
    slides.add_argument("--slide-score", choices=("max", "topk_mean"), default="max", help="score behind slide predictions")
    slides.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of slides for the 95%% intervals")
    slides.add_argument("--workers", type=int, default=1, help="slides tiled in parallel processes")
    slides.add_argument(
        "--export-annotations", choices=("geojson", "asap"), metavar="geojson|asap",
        help="also write DIR/annotations/<slide>.geojson (QuPath: File > Import objects) or .xml (ASAP): every tile "
             "as a level-0 polygon with its predicted class and probabilities",
    )
    slides.add_argument("--export-regions", action="store_true",
                        help="with --export-annotations: add tumour regions merged from adjacent tiles above the threshold")
    return parser


def run(args) -> int:
    from pathlib import Path

    from histotoken.engine.predict import collect_inputs, predict_images, split_slides
    from histotoken.io import atomic_write_text

    if args.export_regions and not args.export_annotations:
        raise ValueError("--export-regions adds regions to the exported annotations; add --export-annotations geojson|asap")
    run_dir = Path(args.run_dir)
    out = Path(args.out)
    csv_path = out if out.suffix.lower() == ".csv" else out / "predictions.csv"
    images, slides = split_slides(collect_inputs(args.paths))
    if images:
        table = predict_images(run_dir, images, tta=args.tta, batch_size=args.batch_size, accelerator=args.accelerator)
        atomic_write_text(csv_path, table.to_csv(index=False))
        failed = int((table["error"] != "").sum())
        counts = table.loc[table["error"] == "", "predicted_class"].value_counts()
        summary = ", ".join(f"{name} {count}" for name, count in counts.items()) or "none"
        print(f"{len(table) - failed} images scored ({summary}){'; ' + str(failed) + ' unreadable' if failed else ''}"
              f"{' (8-view TTA)' if args.tta else ''}")
        print(f"written to {csv_path}")
    if slides:
        slide_dir = out if out.suffix.lower() != ".csv" else out.with_suffix("")
        predict_slides_for_cli(args, run_dir, slides, slide_dir)
    return 0


def predict_slides_for_cli(args, run_dir, slides, out_dir) -> None:
    """Whole-slide inputs: tile and score each slide (histotoken.engine.slides); slide options go here."""
    from pathlib import Path

    from histotoken.data.wsi.annotations import parse_label_map
    from histotoken.engine.predict import predict_slides_dispatch
    result = predict_slides_dispatch(
        run_dir, slides, out_dir, batch_size=args.batch_size, accelerator=args.accelerator,
        annotations_dir=args.annotations, labels_csv=args.labels, label_map=parse_label_map(args.label_map),
        slide_mpp=args.slide_mpp, top_k=args.top_k, slide_score=args.slide_score, n_bootstrap=args.bootstrap,
        workers=args.workers, export_annotations=args.export_annotations, export_regions=args.export_regions,
    )
    print(f"{len(result['slides'])} slides scored, {len(result['failed'])} failed")
    for _, row in result["failed"].iterrows():
        print(f"failed: {row['error']}")
    evaluation = result["eval"]
    if evaluation:
        ci = (evaluation.get("ci95") or {}).get("auroc")
        interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        auroc = "n/a" if evaluation["auroc"] is None else f"{evaluation['auroc']:.3f}{interval}"
        print(f"slides: AUROC {auroc}, accuracy {evaluation['accuracy']:.3f} ({evaluation['n_slides']} slides, "
              f"{evaluation['slide_score']} score)")
        for note in evaluation.get("notes") or []:
            print(f"  NOTE: {note}")
    from histotoken.reporting.slides import build_slide_report

    report = build_slide_report(out_dir)
    if args.export_annotations:
        from histotoken.engine.annotations_export import ANNOTATIONS_EXPORT_DIR

        print(f"annotations for {'QuPath' if args.export_annotations == 'geojson' else 'ASAP'} written to "
              f"{Path(out_dir) / ANNOTATIONS_EXPORT_DIR}")
    print(f"slide outputs written to {out_dir}; slide report: {report}")
