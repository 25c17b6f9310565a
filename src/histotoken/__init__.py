"""histotoken: compare CNNs, ViTs, Mixers and token-efficient models on breast histopathology."""

__version__ = "0.1.0"

from histotoken import models  # noqa: E402,F401  (registers our model families into timm)
