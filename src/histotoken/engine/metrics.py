"""Headline metrics of label tensors, for engine callers: a torch front to :mod:`histotoken.stats`.

Rows of a (R, n) label tensor are independent image sets; entries equal to -1 are padding (rows
may hold different numbers of images). Each row's confusion matrix goes to
:func:`histotoken.stats.metrics_from_confusion`, so the values are scikit-learn's (balanced accuracy
over the classes present in the labels; macro-F1 over the classes in the labels or predictions).
"""

from __future__ import annotations

import numpy as np
import torch

from histotoken import stats

PAD = -1


def headline_metrics(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """Accuracy, balanced accuracy and macro-F1 for each row of (R, n) label tensors, as scikit-learn defines them."""
    y_true = torch.as_tensor(y_true, dtype=torch.long).cpu().numpy()
    y_pred = torch.as_tensor(y_pred, dtype=torch.long).cpu().numpy()
    if y_true.ndim == 1:
        y_true, y_pred = y_true[None], y_pred[None]
    rows = np.broadcast_to(np.arange(len(y_true))[:, None], y_true.shape)
    valid = y_true != PAD
    confusions = np.zeros((len(y_true), num_classes, num_classes), dtype=np.int64)  # (R, C, C), one per row
    np.add.at(confusions, (rows[valid], y_true[valid], y_pred[valid]), 1)
    return {name: torch.as_tensor(value) for name, value in stats.metrics_from_confusion(confusions).items()}
