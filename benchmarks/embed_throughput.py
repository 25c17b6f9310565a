"""Feature-extraction throughput (tiles/s) of `histotoken embed`, with and without token merging (--merge-r).

For resnet18, vit_small_patch16_224 and vit_large_patch16_224 with random weights (speed does not depend on
them) at 224 px, the same tiles go through ``histotoken.features.embed``'s own path: ``create_backbone``
(``timm.create_model(name, num_classes=0)``), the model's preprocessing (``preprocessing`` + ``make_transform``)
and ``extract`` (PNG decoding, transform, batched forward in fp32 under inference mode, as `embed` runs it).
The ViTs are measured again with ToMe merging (``histotoken.models.apply_token_merging``; r=13 for the
12-block ViT-S, r=8 for the 24-block ViT-L unless ``--merge-r`` says otherwise), and the mean cosine
similarity of each tile's merged and unmerged features is printed (1.0 = the same features).

Two figures per row, both the median over interleaved rounds: ``extract`` (end to end, decoding included)
and ``model`` (the backbone's forward on the already-transformed batch alone).

    python benchmarks/embed_throughput.py                      # 64 tiles, 3 rounds, 224 px
    python benchmarks/embed_throughput.py --tiles 128 --threads 2
    python benchmarks/embed_throughput.py --tiny               # smoke run (tests/test_benchmarks_smoke.py)

The tiles are synthetic H&E-like images (``histotoken.data.synthetic``, 256x256 px, drawn once into a
temporary folder), so decoding costs what a real tile's PNG costs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

MERGE_R = {"vit_small_patch16_224": 13, "vit_large_patch16_224": 8}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "vit_small_patch16_224", "vit_large_patch16_224"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--tiles", type=int, default=64, help="tiles per measurement (a multiple of 32)")
    parser.add_argument("--tile-px", type=int, default=256, help="side of the synthetic tile PNGs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--merge-r", type=int, help="tokens merged per block for every ViT (default: 13 ViT-S, 8 ViT-L)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda")
    parser.add_argument("--tiny", action="store_true", help="smoke run: resnet18 and ViT-S at 64 px, 32 tiles, 1 round")
    args = parser.parse_args(argv)
    if args.tiny:
        args.models, args.img_size, args.tiles, args.tile_px = ["resnet18", "vit_small_patch16_224"], 64, 32, 64
        args.rounds, args.batch_size, args.merge_r = 1, 16, args.merge_r or 2
    return args


def make_tiles(folder: Path, tiles: int, side: int) -> list[str]:
    """Paths of ``tiles`` synthetic H&E-like PNGs (32 drawn per pass: 8 subtypes x 4 magnifications)."""
    from histotoken.data.synthetic import generate_synthetic_breakhis

    per_patient = max(1, -(-tiles // 32))
    generate_synthetic_breakhis(folder, patients_per_class=1, images_per_patient=per_patient, size=(side, side), seed=0)
    return sorted(str(path) for path in folder.rglob("*.png"))[:tiles]


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    import torch

    import histotoken  # noqa: F401  (registers our families)
    from histotoken.data.sources import read_image
    from histotoken.engine.environment import cpu_model
    from histotoken.features import embed
    from histotoken.models.token_merging import apply_token_merging, remove_token_merging

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = embed.resolve_device(args.device)
    keys = make_tiles(Path(tempfile.mkdtemp(prefix="embed-throughput-")) / "tiles", args.tiles, args.tile_px)

    variants = []  # (label, backbone, merge r or 0, transform)
    for name in args.models:
        backbone = embed.create_backbone(name, img_size=args.img_size).to(device)
        transform = embed.make_transform(embed.preprocessing(backbone, args.img_size))
        r = (args.merge_r or MERGE_R.get(name, 13)) if hasattr(backbone, "blocks") else 0
        variants.append((name, backbone, 0, transform))
        if r:
            variants.append((f"{name} merge_r={r}", backbone, r, transform))

    def set_merging(backbone, r: int) -> None:
        remove_token_merging(backbone)
        if r:
            apply_token_merging(backbone, r)

    batches = {}  # the transformed tiles of each backbone, for the model-only timing
    for *_, transform in variants:
        if id(transform) not in batches:
            batches[id(transform)] = torch.stack([transform(read_image(key)) for key in keys]).to(device)

    def run_model(backbone, batch) -> None:
        with torch.inference_mode():
            for start in range(0, len(batch), args.batch_size):
                backbone(batch[start:start + args.batch_size])
        if device.type == "cuda":
            torch.cuda.synchronize()

    features, extract_s, model_s = {}, {}, {}
    for label, backbone, r, transform in variants:  # warm-up, and the features compared below
        set_merging(backbone, r)
        features[label] = embed.extract(backbone, keys, transform, args.batch_size, device=device)
        extract_s[label], model_s[label] = [], []
    for _ in range(args.rounds):  # interleaved: every variant once per round
        for label, backbone, r, transform in variants:
            set_merging(backbone, r)
            start = time.perf_counter()
            embed.extract(backbone, keys, transform, args.batch_size, device=device)
            extract_s[label].append(time.perf_counter() - start)
            start = time.perf_counter()
            run_model(backbone, batches[id(transform)])
            model_s[label].append(time.perf_counter() - start)

    rows = []
    for label, backbone, r, _ in variants:
        base = label.split(" merge_r=")[0]
        cosine = None
        if r:
            unmerged, merged = torch.from_numpy(features[base]), torch.from_numpy(features[label])
            cosine = torch.nn.functional.cosine_similarity(unmerged, merged, dim=1).mean().item()
        rows.append({
            "variant": label, "dim": int(backbone.num_features),
            "extract_tiles_s": args.tiles / statistics.median(extract_s[label]),
            "model_tiles_s": args.tiles / statistics.median(model_s[label]),
            "speedup": statistics.median(extract_s[base]) / statistics.median(extract_s[label]),
            "cosine": cosine,
        })

    where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU: {cpu_model()}, {torch.get_num_threads()} threads"
    print(f"{where}; torch {torch.__version__}; fp32 (embed does not autocast); random weights")
    print(f"{args.tiles} tiles ({args.tile_px} px PNG) at {args.img_size} px, batch {args.batch_size}, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'backbone':<36}{'dim':>6}{'extract tiles/s':>17}{'model tiles/s':>15}{'x unmerged':>12}{'cosine':>9}")
    for row in rows:
        cosine = f"{row['cosine']:.4f}" if row["cosine"] is not None else ""
        print(f"{row['variant']:<36}{row['dim']:>6}{row['extract_tiles_s']:>17.1f}{row['model_tiles_s']:>15.1f}"
              f"{row['speedup']:>12.2f}{cosine:>9}")
    return rows


if __name__ == "__main__":
    main()
