"""``histotoken embed``: frozen-backbone features of every image or tile, in HDF5 files."""

from __future__ import annotations

import argparse

from histotoken.cli.common import add_command, add_data_options

DESCRIPTION = """\
Compute features of every image (BreakHis, ImageFolder, CIFAR-10) or every tile of every slide (a
`histotoken tile` folder) with a frozen backbone: any timm model with num_classes=0 (its pooled
forward_features), preprocessed as its pretrained config says (input size, mean/std). Pathology foundation
models load by their timm hub names with --pretrained (network, and any licence terms the hub page sets), or
offline from a weights file with --weights FILE.

Output (--out FEATURES): one FEATURES/<slide>.h5 per slide in the layout CLAM and TRIDENT read
(features float32 N x D, coords int64 N x 2 level-0 x,y, labels, attrs), or FEATURES/features.h5 for an
image set (features, keys as in the index, labels, patient_id, magnification); FEATURES/manifest.json
names the backbone, weights, preprocessing and dimension. Features are computed once: re-running the same
command reuses them, and a killed extraction resumes at the first slide without a finished file.

--merge-r R merges R tokens per block of a ViT backbone (token merging, Bolya et al. 2023) and prints, on a
sample, images/s merged vs unmerged and the cosine similarity of the two features.

Examples:
  histotoken embed tiles --model resnet50 --pretrained --out features/r50
  histotoken embed tiles --model hf-hub:MahmoodLab/uni --weights uni.safetensors --out features/uni
  histotoken embed data/synthetic --model vit_small_patch16_224 --merge-r 8 --out features/vits_r8
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = add_command(subparsers, "embed", "frozen-backbone features into HDF5 (CLAM layout)", DESCRIPTION)
    parser.add_argument("data", metavar="DATA", help="BreakHis root, ImageFolder tree, CIFAR-10 binary or tiles folder")
    parser.add_argument("--model", required=True, help="timm model name, optionally NAME:key=value,...")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", metavar="FILE", help="local .safetensors or timm checkpoint of the backbone")
    weights.add_argument("--pretrained", action="store_true", help="timm hub weights (needs network)")
    parser.add_argument("--merge-r", type=int, default=0, metavar="R", help="token merging: tokens merged per block (ViT)")
    parser.add_argument("--img-size", type=int, metavar="S", help="input size (default: the model's pretrained size)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (default 0)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default auto)")
    parser.add_argument("--out", metavar="FEATURES", required=True, help="feature folder to write (or reuse)")
    add_data_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from histotoken.features.embed import EmbedSettings, embed

    settings = EmbedSettings(
        model=args.model, weights=args.weights, pretrained=bool(args.pretrained), img_size=args.img_size,
        merge_r=args.merge_r, batch_size=args.batch_size, num_workers=args.workers, device=args.device,
        data_format=args.data_format or "auto", groups=args.groups,
    )
    result = embed(args.data, args.out, settings)
    merge = result.merge
    if merge:
        print(
            f"token merging r={merge['r']} on {merge['sample']} images: {merge['tiles_per_s_merged']:.1f} images/s "
            f"merged vs {merge['tiles_per_s_unmerged']:.1f} unmerged ({merge['speedup']:.2f}x); "
            f"mean feature cosine similarity {merge['cosine_similarity']:.4f}"
        )
    print(
        f"{len(result.computed)} feature files computed, {len(result.reused)} reused "
        f"({result.manifest['backbone']}, {result.manifest['dim']} dimensions)"
    )
    print(f"features: {result.out}")
    return 0
