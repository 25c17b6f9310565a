"""histotoken train: train one model on one train domain and write a run folder."""

from __future__ import annotations

from histotoken.cli.common import EPILOG_DOMAINS, add_command, add_data_options

DESCRIPTION = f"""\
Train one image classifier on a BreakHis folder (or an ImageFolder tree, CIFAR-10 binary
batches or a `histotoken tile` folder) and evaluate it on the test patients of its train
domain. Any timm model name works (resnet18, deit_small_patch16_224,
vit_small_patch16_224, swin_tiny_patch4_window7_224, mixer_s16_224, convmixer_768_32, ...)
and so do histotoken's token-efficient families (tokenlearner_vit_small, tokenmixer_small,
cnnprune_vit_small, ...). Model arguments go after a colon: cnnprune_vit_small:keep_ratio=0.5.

Protocol defaults: AdamW lr 3e-4, weight decay 0.05, cosine schedule with warm-up, gradient
clipping 1.0, bf16 mixed precision where the hardware has it, early stopping on validation
macro-F1; the best checkpoint is chosen by validation macro-F1 (ties: accuracy).

The run folder (--out) gets config.yaml, environment.json, splits.csv, metrics.csv,
checkpoints/ and eval/<domain>.json. Re-running the same command resumes an interrupted run;
a finished run is left as it is.

Settings come from defaults <- --config YAML <- flags and KEY=VALUE pairs, e.g. lr=1e-4.
{EPILOG_DOMAINS}

Examples:
  histotoken train --data ~/data/BreaKHis --model resnet18 --task binary --train-domain 100 --out runs/r18_100
  histotoken train --data ~/data/BreaKHis --model deit_small_patch16_224 --task subtype \\
      --train-domain 100+400 --pretrained --out runs/deit_mixed
  histotoken train --config run.yaml --out runs/a epochs=5 lr=1e-4
  histotoken train --data ~/data/BreaKHis --stain-norm macenko --stain-target ref_tile.png \\
      --stain-augment hed --out runs/r18_macenko
"""


def add_parser(subparsers):
    parser = add_command(subparsers, "train", "train one model (writes a run folder)", DESCRIPTION)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="any setting of the run config")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to write (or resume)")
    parser.add_argument("--config", metavar="YAML", help="settings file (flags override it)")
    parser.add_argument("--data", metavar="DATA_ROOT", help="BreakHis root, ImageFolder tree, CIFAR-10 binary or tiles folder")
    parser.add_argument("--model", help="timm model name, optionally NAME:key=value,... (default resnet18)")
    parser.add_argument(
        "--task", choices=["binary", "subtype", "classes"],
        help="BreakHis: benign/malignant or 8 subtypes (default binary); other data: their own classes",
    )
    add_data_options(parser)
    parser.add_argument("--train-domain", metavar="DOMAIN", help="magnification(s) to train on (default all)")
    parser.add_argument("--splits", metavar="CSV", help="a split from `histotoken split` (default: made from the data)")
    parser.add_argument("--img-size", type=int, help="input size in pixels (default 224)")
    parser.add_argument("--epochs", type=int, help="maximum epochs (default 30)")
    parser.add_argument("--stages", metavar="E1,E2", help="epochs per stage for two-stage models (cnnprune_vit_*)")
    parser.add_argument("--batch-size", type=int, help="batch size (default 32)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 3e-4)")
    parser.add_argument("--seed", type=int, help="random seed for split, initialisation and order (default 0)")
    parser.add_argument("--balancing", choices=["none", "class_weights", "sampler"], help="counter class imbalance")
    parser.add_argument("--pretrained", action="store_const", const=True, help="start from timm hub weights (needs network)")
    parser.add_argument("--weights", metavar="FILE", help="start from a local .safetensors or timm checkpoint")
    parser.add_argument("--merge-r", type=int, help="token merging: tokens merged per block (ViT/DeiT)")
    parser.add_argument(
        "--probe", choices=["linear", "knn", "mlp"],
        help="train a probe on frozen --model features instead of fine-tuning (see docs/features.md)",
    )
    parser.add_argument("--features", metavar="FEATURES", help="--probe: a `histotoken embed` folder (default: cached)")
    parser.add_argument(
        "--stain-norm", choices=["none", "macenko", "reinhard", "vahadane"],
        help="normalise every image's stain to --stain-target once, when the image store is built (torchstain)",
    )
    parser.add_argument("--stain-target", metavar="IMAGE", help="target H&E image of --stain-norm (copied to the run)")
    parser.add_argument(
        "--stain-augment", choices=["none", "hed"], help="hed: HED stain jitter in training (Tellez et al. 2018)"
    )
    parser.add_argument("--devices", help="devices per node, e.g. 1, 4 or auto (default auto)")
    parser.add_argument("--accelerator", help="cpu, gpu or auto (default auto)")
    parser.add_argument(
        "--strategy", help="Lightning strategy, e.g. ddp for several devices (torchrun and SLURM are detected)"
    )
    parser.add_argument("--num-nodes", type=int, help="machines in a multi-node run (default 1)")
    parser.add_argument("--layer-decay", type=float, help="layer-wise lr decay for fine-tuning ViTs, e.g. 0.65")
    parser.add_argument(
        "--logger", choices=["none", "csv", "tensorboard", "mlflow", "wandb"],
        help="also log to this experiment tracker (metrics.csv is always written)",
    )
    parser.add_argument("--logger-uri", metavar="URI", help="MLflow tracking URI (default: RUN_DIR/mlruns)")
    parser.add_argument("--precision", choices=["auto", "32-true", "bf16-mixed", "16-mixed"], help="numeric precision (default auto)")
    return parser


FLAG_FIELDS = {
    "stain_norm": "stain_norm", "stain_target": "stain_target", "stain_augment": "stain_augment",
    "data": "data", "data_format": "data_format", "groups": "groups",
    "model": "model", "task": "task", "train_domain": "train_domain", "splits": "splits",
    "img_size": "img_size", "epochs": "epochs", "stages": "stage_epochs", "batch_size": "batch_size",
    "lr": "lr", "seed": "seed", "balancing": "balancing", "pretrained": "pretrained", "weights": "weights",
    "merge_r": "merge_r", "devices": "devices", "accelerator": "accelerator", "precision": "precision",
    "strategy": "strategy", "num_nodes": "num_nodes", "layer_decay": "layer_decay", "logger": "logger",
    "logger_uri": "logger_uri",
}


def run(args) -> int:
    from histotoken.config import load_run_config, parse_overrides
    from histotoken.engine.fit import train
    from histotoken.engine.ranks import is_global_zero

    overrides = {field: getattr(args, flag) for flag, field in FLAG_FIELDS.items() if getattr(args, flag) is not None}
    overrides.update(parse_overrides(args.overrides))
    config = load_run_config(args.config, overrides)
    if args.probe:  # frozen features + a scikit-learn probe (histotoken.features.probe)
        return _run_probe(args, config)
    result = train(config, args.out)
    if not is_global_zero():  # other processes of a multi-device run stay quiet
        return 0
    if result.already_finished:
        print(f"{result.run_dir} is already finished; nothing to do (delete it to train again).")
    else:
        ev = result.evaluation
        print(
            f"best epoch {result.best.get('epoch')}: val macro-F1 {result.best.get('val/macro_f1'):.3f}; "
            f"test ({ev['domain']}): macro-F1 {ev['macro_f1']:.3f}, accuracy {ev['accuracy']:.3f}, "
            f"patient accuracy {ev['patient_accuracy']:.3f}"
        )
    print(f"run folder: {result.run_dir}")
    return 0


def _run_probe(args, config) -> int:
    from histotoken.features.probe import ProbeSettings, train_probe

    result = train_probe(config, args.out, ProbeSettings(kind=args.probe), args.features, args.img_size)
    if result.already_finished:
        print(f"{result.run_dir} is already finished; nothing to do (delete it to train again).")
    else:
        ev = result.evaluation
        print(f"{args.probe} probe on {config.model} features ({result.features}): test ({ev['domain']}) "
              f"macro-F1 {ev['macro_f1']:.3f}, accuracy {ev['accuracy']:.3f}, patient accuracy {ev['patient_accuracy']:.3f}")
    print(f"run folder: {result.run_dir}")
    return 0
