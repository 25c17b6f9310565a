"""Token merging: the paper's placement (``merge_mode=tome``) against ``pre_attention``, side by side.

For one DeiT (default ``deit_small_patch16_224``) this prints, for the unmerged model and both
placements at every ``r``:

- throughput (images/s at ``--batch-size``) and GFLOPs, measured by ``histotoken.engine.benchmark``
  in one process, interleaved (every round visits every variant once; medians over rounds);
- tokens seen by each block (an r schedule with ``--inflection``, ToMe's ``parse_r``: -1 merges
  2r in the first block down to 0 in the last; the default 0 merges r in every block);
- agreement: the % of images on which the merged model's predicted class (argmax) equals the
  unmerged model's, and the largest logit difference.

Agreement with random weights says little about a trained model's behaviour; pass ``--run RUN_DIR``
(a ``histotoken train`` output folder of a ViT/DeiT) to load its best weights
(``histotoken.engine.evaluate.load_best_model``) and score the test images of its split. Timing
is then still done at the run's image size with the same architecture.

    python benchmarks/token_merging_placement.py                       # deit_small, r 8 and 13, 224 px
    python benchmarks/token_merging_placement.py --run runs/deit_s_40x --rounds 5
    python benchmarks/token_merging_placement.py --img-size 64 --rounds 1 --batch-size 4   # smoke test
    python benchmarks/token_merging_placement.py --inflection -1                       # decreasing schedule

Run it on an otherwise idle machine; ratios within one table are what to compare.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path

import torch

from histotoken.engine.benchmark import benchmark_models
from histotoken.models.factory import ModelSpec, create_model
from histotoken.models.records import record_tokens
from histotoken.models.token_merging import MODES, apply_token_merging

logger = logging.getLogger("token_merging_placement")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224", help="a timm ViT/DeiT name (ignored with --run)")
    parser.add_argument("--run", type=Path, default=None, help="a training run folder: use its best weights and test images")
    parser.add_argument("--r", type=int, nargs="+", default=[8, 13], help="tokens merged per block (default: 8 13)")
    parser.add_argument(
        "--inflection", type=float, default=0.0,
        help="r schedule (ToMe's parse_r): -1 decreasing from 2r to 0, +1 increasing, 0 constant (default: 0)",
    )
    parser.add_argument("--img-size", type=int, default=224, help="image side in pixels (default: 224; a run's own size with --run)")
    parser.add_argument("--batch-size", type=int, default=32, help="throughput batch size (default: 32)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default: 5)")
    parser.add_argument("--images", type=int, default=256, help="images scored for agreement (default: 256)")
    parser.add_argument("--num-classes", type=int, default=8, help="classes of the random-weight model (default: 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    return parser.parse_args(argv)


def variant_specs(name: str, rs: list[int], extra: dict, inflection: float = 0.0) -> list[tuple[str, ModelSpec]]:
    """(label, spec) for the unmerged model and each placement at each r, interleaving r."""
    base = dict(extra)
    variants = [("unmerged", ModelSpec(name, tuple(sorted(base.items()))))]
    for r in rs:
        for mode in MODES:
            kwargs = dict(base, merge_r=r, merge_mode=mode)
            if inflection:
                kwargs["merge_inflection"] = inflection
            variants.append((f"{mode} r={r}", ModelSpec(name, tuple(sorted(kwargs.items())))))
    return variants


def random_images(count: int, img_size: int) -> torch.Tensor:
    """Smooth random images (low-frequency noise upsampled), so that neighbouring patches are alike as in tissue."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.randn(count, 3, max(img_size // 16, 2), max(img_size // 16, 2), generator=generator)
    fine = 0.3 * torch.randn(count, 3, img_size, img_size, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(img_size, img_size), mode="bilinear") + fine


def run_test_images(run_dir: Path, model: torch.nn.Module, img_size: int, count: int) -> torch.Tensor:
    """Up to ``count`` test images of the run's split, normalised for ``model``."""
    from histotoken.data.dataset import ImageStore
    from histotoken.data.splits import read_split
    from histotoken.data.transforms import model_normalisation
    from histotoken.formats import RunPaths

    split = read_split(RunPaths(run_dir).splits)
    test = split[split["split"] == "test"].head(count)
    if test.empty:
        raise ValueError(f"{RunPaths(run_dir).splits} has no test images; give a run trained with a test split")
    store = ImageStore.build(test, img_size, universe=split)
    mean, std = model_normalisation(model)
    images = store.images.float() / 255.0  # (N, 3, S, S) uint8 -> [0, 1]
    return (images - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


@torch.inference_mode()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(batch) for batch in images.split(batch_size)]).float()


def agreement(
    base: torch.nn.Module, images: torch.Tensor, rs: list[int], batch_size: int, inflection: float = 0.0
) -> dict[str, tuple[float, float, list[int]]]:
    """label -> (% same argmax as unmerged, max |logit difference|, tokens each block saw)."""
    base = base.eval()
    expected = predict(base, images, batch_size)
    result = {}
    for r in rs:
        for mode in MODES:
            merged = apply_token_merging(copy.deepcopy(base), r, mode=mode, inflection=inflection)
            with record_tokens(merged) as record:
                logits = predict(merged, images, batch_size)
            same = (logits.argmax(dim=1) == expected.argmax(dim=1)).float().mean().item() * 100
            result[f"{mode} r={r}"] = (same, (logits - expected).abs().max().item(), record.tokens_per_block)
    return result


def fitting_r(rs: list[int], num_patches: int) -> list[int]:
    """The requested r values, clipped to what the first block can merge (half the patches)."""
    limit = num_patches // 2
    if any(r > limit for r in rs):
        logger.warning("%d patches allow r <= %d per block; larger r values are clipped to %d", num_patches, limit, limit)
    return sorted({min(int(r), limit) for r in rs})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run is not None:
        from histotoken.engine.evaluate import load_best_model

        base, meta = load_best_model(args.run, merge_r=0)
        name, img_size, num_classes = meta["model_name"], int(meta["img_size"]), int(meta["num_classes"])
        extra = {k: v for k, v in meta.get("model_kwargs", {}).items() if k not in ("merge_r", "merge_mode")}
        images = run_test_images(args.run, base, img_size, args.images)
        source = f"{len(images)} test images of {args.run} (trained weights)"
    else:
        name, img_size, num_classes, extra = args.model, args.img_size, args.num_classes, {}
        torch.manual_seed(0)
        base = create_model(name, num_classes, img_size)
        images = random_images(args.images, img_size)
        source = f"{len(images)} smooth random images (random weights)"

    rs = fitting_r(args.r, int(base.patch_embed.num_patches))
    scores = agreement(base, images, rs, args.batch_size, args.inflection)
    variants = variant_specs(name, rs, extra, args.inflection)
    rows = benchmark_models(
        [spec for _, spec in variants], img_size=img_size, batch_size=args.batch_size,
        num_classes=num_classes, rounds=args.rounds, device=args.device,
    )

    schedule = f", r schedule inflection {args.inflection:g}" if args.inflection else ""
    print(f"\n{name} at {img_size} px, batch {args.batch_size}, {args.rounds} interleaved rounds{schedule}; agreement on {source}")
    header = f"{'variant':<22} {'img/s':>8} {'x unmerged':>10} {'GFLOPs':>7} {'same argmax %':>14} {'max |dlogit|':>12}  tokens per block"
    print(header)
    print("-" * len(header))
    for (label, _), row in zip(variants, rows):
        same, diff, tokens = scores.get(label, (100.0, 0.0, row["tokens_per_block"]))
        print(
            f"{label:<22} {row['throughput_img_s']:>8.1f} {row['throughput_ratio']:>10.2f} {row['gflops']:>7.2f} "
            f"{same:>14.1f} {diff:>12.3g}  {' '.join(str(count) for count in tokens)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
