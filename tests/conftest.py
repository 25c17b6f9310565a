"""Shared fixtures: a tiny synthetic BreakHis made once per test session, and an isolated cache."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Index caches go to a throwaway folder, never to the developer's home.
os.environ.setdefault("HISTOTOKEN_CACHE", tempfile.mkdtemp(prefix="histotoken-test-cache-"))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """8 subtypes x 3 patients x 2 images x 4 magnifications at 64x48 px (192 images)."""
    from histotoken.data.synthetic import generate_synthetic_breakhis

    root = tmp_path_factory.mktemp("synthetic") / "breakhis"
    generate_synthetic_breakhis(root, patients_per_class=3, images_per_patient=2, size=(64, 48), seed=0)
    return root


@pytest.fixture(scope="session")
def learnable_root(tmp_path_factory) -> Path:
    """More patients at two magnifications, for tests where a model must learn (4 train patients a class)."""
    from histotoken.data.synthetic import generate_synthetic_breakhis

    root = tmp_path_factory.mktemp("learnable") / "breakhis"
    generate_synthetic_breakhis(
        root, patients_per_class=6, images_per_patient=4, magnifications=(100, 400), size=(64, 48), seed=1
    )
    return root


def write_png(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 30)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=128 if mode == "L" else (200, 100, 150, 255)[: len(mode)]).save(path)
    return path
