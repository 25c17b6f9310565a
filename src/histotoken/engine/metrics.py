"""Classification metrics that equal scikit-learn's, for one image set or a batch of bootstrap resamples.

The per-class counts come from torchmetrics (vectorised over resamples with
``multidim_average="samplewise"``); what is averaged over which classes follows
``sklearn.metrics`` exactly, because that is what readers compare against:

- ``accuracy``: ``accuracy_score``.
- ``balanced_accuracy``: ``balanced_accuracy_score``, the mean recall over the classes that occur
  in the *labels*. A class that is only predicted (absent from the labels of a test set or of a
  resample) does not count as a recall of 0 (torchmetrics' macro recall would count it).
- ``macro_f1``: ``f1_score(average="macro")`` with its default label set, the classes that occur in
  the labels *or* the predictions; a class that occurs in neither is left out.

Rows of a (R, n) label tensor are independent image sets; entries equal to -1 are padding (rows
may hold different numbers of images).
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_f1_score,
    multiclass_recall,
)

PAD = -1


def _class_counts(y_true: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(R, C) number of images of each class per row, padding ignored."""
    valid = y_true >= 0
    one_hot = torch.nn.functional.one_hot(y_true.clamp(min=0), num_classes) * valid.unsqueeze(-1)
    return one_hot.sum(dim=1)


def headline_metrics(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """Accuracy, balanced accuracy and macro-F1 for each row of (R, n) label tensors, as scikit-learn defines them."""
    y_true = torch.as_tensor(y_true, dtype=torch.long)
    y_pred = torch.as_tensor(y_pred, dtype=torch.long)
    if y_true.ndim == 1:
        y_true, y_pred = y_true[None], y_pred[None]
    y_pred = torch.where(y_true == PAD, torch.zeros_like(y_pred), y_pred)  # padding is ignored anyway
    # torchmetrics needs at least two classes; a class that never occurs changes none of the averages
    num_classes = max(num_classes, 2)
    options = {"num_classes": num_classes, "multidim_average": "samplewise", "ignore_index": PAD}
    in_labels = _class_counts(y_true, num_classes) > 0  # (R, C)
    predicted = _class_counts(torch.where(y_true == PAD, PAD, y_pred), num_classes) > 0
    recall = multiclass_recall(y_pred, y_true, average="none", **options)  # (R, C)
    f1 = multiclass_f1_score(y_pred, y_true, average="none", **options)  # (R, C)
    in_f1 = in_labels | predicted
    return {
        "accuracy": multiclass_accuracy(y_pred, y_true, average="micro", **options),
        "balanced_accuracy": (recall * in_labels).sum(1) / in_labels.sum(1).clamp(min=1),
        "macro_f1": (f1 * in_f1).sum(1) / in_f1.sum(1).clamp(min=1),
    }

