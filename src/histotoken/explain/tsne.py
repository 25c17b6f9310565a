"""t-SNE of a model's pooled features (``forward_head(forward_features(x), pre_logits=True)``).

van der Maaten and Hinton, "Visualizing Data using t-SNE", JMLR 2008; scikit-learn's ``TSNE`` after
``PCA`` to at most 50 dimensions (the usual denoising and speed-up step).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

PCA_DIMENSIONS = 50


def pooled_features_and_logits(
    model: nn.Module, images: torch.Tensor, mean, std, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 3, H, W) images -> pooled features (N, D) and logits (N, C), from one forward pass each batch."""
    mean_t = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    features, logits = [], []
    with torch.no_grad():
        for batch in images.split(batch_size):
            x = (batch.float() / 255.0 - mean_t) / std_t
            pooled = model.forward_head(model.forward_features(x), pre_logits=True)
            head = model.get_classifier() if hasattr(model, "get_classifier") else model.head
            features.append(pooled.float().flatten(1))
            logits.append(head(pooled).float())
    return torch.cat(features).numpy(), torch.cat(logits).numpy()


def tsne_embedding(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, 2) t-SNE embedding (PCA to at most 50 dimensions first); N must be at least 3."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    count = features.shape[0]
    if count < 3:
        raise ValueError(f"t-SNE needs at least 3 images, got {count}")
    dimensions = min(PCA_DIMENSIONS, count, features.shape[1])
    reduced = PCA(n_components=dimensions, random_state=seed).fit_transform(features)
    perplexity = float(min(30.0, max(1.0, (count - 1) / 3.0)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced)
