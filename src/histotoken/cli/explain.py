"""histotoken explain: what a trained run looks at, and whether its maps are faithful."""

from __future__ import annotations

from histotoken.cli.common import add_command

METHOD_CHOICES = ("auto", "rollout", "gradcam", "tokens", "all")  # histotoken.explain.run.METHOD_CHOICES
DEFAULT_N = 16

DESCRIPTION = """\
Explain a run's predictions on the test patients of one magnification. Picks up to N test
images (per class, the most confident true positives, false positives and false negatives),
computes the model's explanation maps and writes PNG figures and explain.json to
RUN_DIR/explain/<domain>/ (or --out):

  ViT / DeiT           attention rollout (Abnar and Zuidema 2020)
  TokenLearner-ViT     the TokenLearner's spatial maps, plus rollout up to the learner
  TokenMixer           the TokenLearner's spatial maps
  CNN-pruned ViT       the scorer's importance map and the patches the ViT kept
  token merging        rollout through the merges, and which patches each merged token holds
  CNN, Swin, Mixer     Grad-CAM (pytorch-grad-cam)

explain.json scores every map with deletion and insertion curves (Petsiuk et al., RISE 2018)
against random patch orders, and the t-SNE figure shows the pooled features of the whole test
split coloured by class and by magnification.

Examples:
  histotoken explain runs/deit_100 --domain 100
  histotoken explain runs/r18_100 --domain 400 --n 8 --method all --out explain_r18_400
"""


def add_parser(subparsers):
    parser = add_command(subparsers, "explain", "explanation maps, t-SNE and faithfulness of a run", DESCRIPTION)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `histotoken train`")
    parser.add_argument("--domain", required=True, help="test magnification to explain (e.g. 100)")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="images to explain (default %(default)s)")
    parser.add_argument("--method", choices=METHOD_CHOICES, default="auto",
                        help="auto: the model's own explanation; all: also Grad-CAM (default %(default)s)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default RUN_DIR/explain/<domain>/)")
    parser.add_argument("--steps", type=int, default=12, help="steps of the deletion/insertion curves")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random patch orders and t-SNE")
    return parser


def run(args) -> int:
    from pathlib import Path

    from histotoken.explain.run import explain_run
    from histotoken.formats import EXPLAIN_SCORES, RunPaths

    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    result = explain_run(args.run_dir, args.domain, n=args.n, method=args.method, out=args.out,
                         steps=args.steps, seed=args.seed)
    out = Path(args.out) if args.out else RunPaths(Path(args.run_dir)).explain_dir(result["domain"])
    print(f"explained {result['n_images']} test images of {result['domain']} with "
          f"{', '.join(result['methods']) or 'no saliency method'} in {result['timing_s']['total']:.1f} s")
    for method, score in result["faithfulness"].items():
        verdict = score.get("verdict") or ("not resolved" if score["no_better_than_random"] else "better than random")
        print(f"  {method}: deletion AUC {score['deletion_auc']:.3f} (random {score['random_deletion_auc']:.3f}), "
              f"insertion AUC {score['insertion_auc']:.3f} (random {score['random_insertion_auc']:.3f}): {verdict}")
    print(f"figures and {EXPLAIN_SCORES} written to {out}")
    return 0
