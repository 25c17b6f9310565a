"""A run folder made without training: a freshly initialised model saved as the run's best weights.

Predict and export read only config.yaml, splits.csv and checkpoints/best.{safetensors,json}, so
tests can make a run in a fraction of a second instead of training one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
import yaml
from safetensors.torch import save_file

from histotoken.formats import RunPaths
from histotoken.io import atomic_write_json


def make_run(
    run_dir: Path,
    model_name: str,
    class_names: Sequence[str],
    img_size: int,
    test_images: Sequence[Path] = (),
    model_kwargs: dict | None = None,
    seed: int = 0,
) -> Path:
    from histotoken.models.factory import ModelSpec, create_model

    paths = RunPaths(Path(run_dir))
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    kwargs = dict(model_kwargs or {})
    torch.manual_seed(seed)
    model = create_model(ModelSpec(model_name, tuple(sorted(kwargs.items()))), len(class_names), img_size)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(paths.best_weights))
    atomic_write_json(paths.best_meta, {
        "model_name": model_name, "model_kwargs": kwargs, "num_classes": len(class_names),
        "class_names": list(class_names), "task": "subtype", "img_size": img_size, "train_domain": "all",
        "merge_r": int(kwargs.get("merge_r", 0)), "precision": "32-true", "epoch": 0,
    })
    paths.config.write_text(yaml.safe_dump({
        "model": model_name, "img_size": img_size, "precision": "32-true", "accelerator": "cpu", "seed": seed,
    }))
    rows = [
        {"path": str(path), "patient_id": "p1", "tumor_class": class_names[0], "label": "benign",
         "magnification": 100, "split": "test"}
        for path in test_images
    ]
    pd.DataFrame(rows, columns=["path", "patient_id", "tumor_class", "label", "magnification", "split"]).to_csv(
        paths.splits, index=False
    )
    return paths.root


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> Path:
    """A random RGB PNG (or any format PIL infers from the suffix)."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path
