"""histotoken export: a trained run as ONNX, TorchScript or a timm hub folder, checked against PyTorch."""

from __future__ import annotations

from histotoken.cli.common import add_command

DESCRIPTION = """\
Export a run's best checkpoint for use outside histotoken, and check the export: the exported
model and PyTorch score the same images (the run's test images, or random images when the data is
absent) and the maximum absolute difference of their logits must stay within --tolerance.
  onnx         model.onnx (dynamic batch axis; input "images", output "logits"), checked in onnxruntime
  torchscript  model.torchscript.pt (torch.jit.script, or trace where a model does not script)
  timm         config.json + model.safetensors in timm's hub layout: after `import histotoken`,
               timm.create_model("local-dir:DIR", pretrained=True) loads it
Beside the model, export.json records the class names, normalisation (mean/std), input size and the run.
Input to every format: float32 (batch, 3, S, S) RGB scaled to [0, 1] and normalised with mean/std.

Examples:
  histotoken export runs/r18_100 --format onnx
  histotoken export runs/deit_100 --format timm --out exported/deit_100
  histotoken export runs/r18_100 --format onnx --out r18.onnx     # r18.onnx + r18.export.json
"""


def add_parser(subparsers):
    from histotoken.formats import EXPORT_FORMATS

    parser = add_command(subparsers, "export", "export a run (onnx, torchscript, timm folder)", DESCRIPTION)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `histotoken train`")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, dest="export_format")
    parser.add_argument("--out", metavar="PATH",
                        help="output folder (default: RUN_DIR/export/<format>), or the model file itself: "
                             "a name ending .onnx (onnx) or .pt/.ts (torchscript); its manifest is then "
                             "NAME.export.json beside it")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted |logit difference| to PyTorch (default %(default)g)")
    parser.add_argument("--check-images", type=int, default=8, help="test images used for the check")
    parser.add_argument("--onnx-exporter", choices=("torchscript", "dynamo"), default="torchscript",
                        help="torch.onnx exporter: TorchScript-based (default) or dynamo")
    return parser


def run(args) -> int:
    from histotoken.engine.export import export_run

    result = export_run(
        args.run_dir, args.export_format, args.out, check_batch=args.check_images,
        tolerance=args.tolerance, onnx_exporter=args.onnx_exporter,
    )
    print(f"{args.export_format} export ({result.method}): max |logit difference| to PyTorch "
          f"{result.max_abs_diff:.3g} on {result.check_images} {result.check_source} (tolerance {args.tolerance:g})")
    print(f"written to {result.model_file} (with {result.manifest.name})")
    return 0
