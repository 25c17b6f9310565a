"""histotoken: compare CNNs, ViTs, Mixers and token-efficient models on breast histopathology.

``import histotoken`` registers our model families into timm (``histotoken.models``), so that
``timm.create_model("tokenlearner_vit_tiny")`` works right after it. That import costs torch and timm
(seconds of CPU), which the ``histotoken`` command must not pay to print its help. So in the command
line's own process (the ``histotoken`` console script, or ``python -m histotoken.cli.main``), and
wherever ``HISTOTOKEN_DEFER_MODELS=1`` is set, registration is deferred: ``histotoken.cli.main``
imports ``histotoken.models`` itself before it runs a command that builds models, after the
arguments (and ``--help``) have been handled. Every other process (library use, notebooks, tests,
submitit workers) registers on import, as before.
"""

import os
import sys

__version__ = "0.1.0"


def _command_line_process() -> bool:
    """True when this process is the ``histotoken`` command (or registration is deferred by the environment)."""
    if os.environ.get("HISTOTOKEN_DEFER_MODELS") == "1":
        return True
    if os.path.basename(sys.argv[0] if sys.argv else "") == "histotoken":  # the console script
        return True
    arguments = list(getattr(sys, "orig_argv", []))
    return any(a == "-m" and b == "histotoken.cli.main" for a, b in zip(arguments, arguments[1:]))


if not _command_line_process():
    from histotoken import models  # noqa: F401  (registers our model families into timm)
