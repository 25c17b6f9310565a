"""``histotoken`` entry point: builds the argument parser from one module per command.

Each command module defines ``add_parser(subparsers)`` (which registers its options and
help text, with an example) and ``run(args) -> int``. Heavy imports (torch, timm, lightning)
happen inside ``run`` so that ``histotoken --help`` and ``histotoken COMMAND --help`` import neither
torch nor timm (tests/test_cli.py checks it; benchmarks/cli_help.py measures it). In this process
``import histotoken`` does not register the model families (see histotoken/__init__.py): ``main``
imports ``histotoken.models`` before it runs any command outside ``LIGHT_COMMANDS``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

COMMANDS = ["synth", "index", "split", "tile", "embed", "train", "evaluate", "predict", "export", "benchmark", "grid", "report", "explain", "demo", "slides"]

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

Frozen features and slides:
  histotoken embed tiles --model resnet18 --weights r18.safetensors --out features    # one HDF5 per slide
  histotoken train --probe linear --model resnet18 --data data/synthetic --out runs/probe
  histotoken slides train --features features --labels slides.csv --aggregator abmil --out runs/abmil
"""

# commands that build no model: they need not import torch and timm (histotoken/__init__ defers that here)
LIGHT_COMMANDS = {"synth", "index", "split", "tile"}


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


class LightningChatter(logging.Filter):
    """On the command line's handler: Lightning's INFO messages only with -v, and each at most once.

    Lightning prints the same start-up banner ("GPU available: ...", "TPU available: ...",
    "LOCAL_RANK: ...") for every Trainer, and a command may build several (training, then the
    evaluation; predict in chunks). Its warnings always pass.
    """

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("lightning") or record.levelno >= logging.WARNING:
            return True
        if not self.verbose:
            return False
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def configure_logging(verbose: bool) -> None:
    """Our messages at INFO; Lightning's start-up chatter (once) and library deprecation notes only with -v.

    Lightning resets its loggers' levels when it is imported (after this runs, inside a command), so
    its chatter is filtered on our handler instead; ``engine.inference.route_lightning_logging``
    sends Lightning's records to that handler only (Lightning also installs a console handler of its own).
    """
    import warnings

    root = logging.getLogger()
    existing = list(root.handlers)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    chatter = LightningChatter(verbose)
    for handler in root.handlers:
        if handler not in existing:  # ours; a host that configured logging itself keeps its handlers as they are
            handler.addFilter(chatter)
    if not verbose:
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", module=r"lightning\..*")
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    configure_logging(args.verbose)
    if args.command not in LIGHT_COMMANDS:
        import histotoken.models  # noqa: F401  (registers our families into timm; deferred in this process, see histotoken/__init__)
    from histotoken.engine.interrupt import RunInterrupted, interruptible

    try:
        with interruptible():
            return int(args._run(args) or 0)
    except RunInterrupted as interruption:
        print(f"histotoken {args.command}: interrupted ({interruption}); {AFTER_INTERRUPTION.get(args.command, RERUN)}",
              file=sys.stderr)
        return interruption.exit_code
    except (FileNotFoundError, ValueError) as error:
        # Library code raises ValueError/FileNotFoundError with messages written for users.
        print(f"histotoken {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # read-only folder, full disk, a file where a folder should be, ...
        print(f"histotoken {args.command}: error: {os_error_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the handler was installed
        print(f"histotoken {args.command}: interrupted; {AFTER_INTERRUPTION.get(args.command, RERUN)}", file=sys.stderr)
        return 130
    except Exception as error:
        if type(error).__name__ != "MisconfigurationException":  # Lightning's (e.g. --accelerator gpu without a GPU)
            raise
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"histotoken {args.command}: error: {first_line}; check --accelerator/--devices/--precision "
              "(--accelerator cpu or auto runs anywhere)", file=sys.stderr)
        return 2


RERUN = "re-run the same command."
# what an interrupted command keeps, in its own words (tile/evaluate have no epochs)
AFTER_INTERRUPTION = {
    "train": "finished epochs are saved. Re-run the same command to resume.",
    "grid": "finished runs and epochs are saved. Re-run the same command to resume.",
    "demo": "finished runs and epochs are saved. Re-run the same command to resume.",
    "tile": "slides already tiled are kept. Re-run the same command to tile the rest.",
    "synth": "images already written are kept. Re-run the same command to complete the set.",
    "evaluate": "evaluations already written are kept; re-run the same command for the rest.",
}

_OS_ERROR_FIXES = {
    errno.EROFS: "the file system is read-only: give an --out on a writable disk",
    errno.EACCES: "permission denied: give an --out you can write to, or fix the folder's permissions",
    errno.EPERM: "operation not permitted: give an --out you can write to, or fix the folder's permissions",
    errno.ENOSPC: "the disk is full: free some space or give an --out on another disk, then re-run",
    errno.EDQUOT: "the disk quota is exhausted: free some space or give an --out elsewhere, then re-run",
    errno.EEXIST: "a file is in the way where a folder should be: move it, or give another --out",
    errno.ENOTDIR: "a file is in the way where a folder should be: move it, or give another --out",
    errno.EISDIR: "a folder is where a file should be: move it, or give another file name",
}


def os_error_line(error: OSError) -> str:
    """One line for an OSError: the path(s), what went wrong and what to do about it."""
    paths = " -> ".join(str(name) for name in (error.filename, error.filename2) if name)
    fix = _OS_ERROR_FIXES.get(error.errno or -1, error.strerror or str(error))
    return f"{paths or 'a file'}: {fix}" + (f" ({error.strerror})" if error.strerror and error.errno in _OS_ERROR_FIXES else "")

if __name__ == "__main__":
    sys.exit(main())
