"""``histotoken`` entry point: builds the argument parser from one module per command.

Each command module defines ``add_parser(subparsers)`` (which registers its options and
help text, with an example) and ``run(args) -> int``. Heavy imports (torch, lightning)
happen inside ``run`` so that ``histotoken --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = ["synth", "index", "split", "tile", "train", "evaluate", "predict", "export", "benchmark", "grid", "report", "explain", "demo"]

DESCRIPTION = """\
histotoken trains, evaluates and compares image classifiers (CNNs, ViTs, MLP-Mixers and
token-efficient models) for breast-cancer histopathology on BreakHis-style folders.

Typical workflow:
  histotoken synth data/synthetic                      # or use your own BreaKHis_v1 copy
  histotoken index data/synthetic                      # what is in the folder
  histotoken split data/synthetic --out splits.csv     # patient-disjoint train/val/test
  histotoken train --data data/synthetic --model resnet18 --train-domain 100 --out runs/r18
  histotoken evaluate runs/r18 --domain 400            # cross-magnification test
  histotoken grid demo.yaml --data data/synthetic --out study   # many runs + report.html
"""


TRAINING_COMMANDS = {"train", "grid", "demo"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="histotoken", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"histotoken.cli.{name}")
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def configure_logging(verbose: bool, trains: bool = False) -> None:
    """Our messages at INFO; Lightning's start-up chatter and library deprecation notes only with -v."""
    import warnings

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        if trains:
            import lightning.pytorch  # noqa: F401  (it sets its own log levels on import; override them after)
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("lightning"):
                logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", module=r"lightning\..*")
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    configure_logging(args.verbose, args.command in TRAINING_COMMANDS)
    from histotoken.engine.interrupt import RunInterrupted, interruptible

    try:
        with interruptible():
            return int(args._run(args) or 0)
    except RunInterrupted as interruption:
        print(
            f"histotoken {args.command}: interrupted ({interruption}); finished epochs are saved. "
            "Re-run the same command to resume.",
            file=sys.stderr,
        )
        return interruption.exit_code
    except (FileNotFoundError, ValueError) as error:
        # Library code raises ValueError/FileNotFoundError with messages written for users.
        print(f"histotoken {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the handler was installed
        print(f"histotoken {args.command}: interrupted; re-run the same command to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
