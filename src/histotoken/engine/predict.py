"""``predict_images()``: class probabilities of a trained run for image files (histotoken predict).

Each image is decoded and resized to the run's input size exactly as training did
(:func:`histotoken.data.dataset.load_image`), stain-normalised when the run was, and scored through
:func:`histotoken.engine.inference.predict_logits` with the run's accelerator and precision. An image
that cannot be decoded gets a row with its error instead of a prediction; the others go on.

Test-time augmentation (``tta=True``) averages the softmax over the 8 views of the dihedral group
(rotations by 0, 90, 180, 270 degrees, each with and without a horizontal flip); histology has no
canonical orientation and training used the same flips and right-angle rotations. Because the
views form a group, the averaged probabilities are the same for an image and any of its rotated or
flipped copies.

Whole-slide files (.svs, .ndpi, .mrxs, and .tif/.tiff that OpenSlide opens as a pyramid) are not
images: :func:`split_slides` sets them apart and ``histotoken predict`` hands them to
:func:`histotoken.engine.slides.predict_slides` (see :func:`predict_slides_dispatch`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from histotoken.data.decode import IMAGE_SUFFIXES  # every format the shared decoder reads
from histotoken.formats import PREDICT_COLUMNS, PREDICT_ERROR_COLUMN, PROBABILITY_PREFIX

logger = logging.getLogger(__name__)

SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs")  # always slides; .tif/.tiff only when OpenSlide sees a pyramid
DIHEDRAL_VIEWS = tuple((quarter_turns, flip) for flip in (False, True) for quarter_turns in range(4))
CHUNK_IMAGES = 1024  # images decoded and scored at a time (bounds memory on large folders)


# --------------------------------------------------------------------------- inputs


def collect_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Image and slide files from files and folders (folders searched recursively, sorted).

    A path that does not exist is an error (a typo); a folder without images is an error too.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            inside = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + SLIDE_SUFFIXES
            )
            if not inside:
                raise FileNotFoundError(
                    f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}) or slides; check the path"
                )
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist; give image files or folders of images")
    return found


def is_whole_slide(path: Path) -> bool:
    """True for slide files: .svs/.ndpi/.mrxs, and .tif/.tiff that OpenSlide opens with several levels."""
    suffix = path.suffix.lower()
    if suffix in SLIDE_SUFFIXES:
        return True
    if suffix not in (".tif", ".tiff"):
        return False
    try:
        import openslide

        if openslide.OpenSlide.detect_format(str(path)) is None:
            return False
        with openslide.OpenSlide(str(path)) as slide:
            return slide.level_count > 1
    except Exception:  # noqa: BLE001  (not a slide OpenSlide can open: treat it as an image)
        return False


def split_slides(files: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(image files, whole-slide files), each in input order."""
    images, slides = [], []
    for path in files:
        (slides if is_whole_slide(path) else images).append(path)
    return images, slides


def predict_slides_dispatch(run_dir: Path, slides: Sequence[Path], out_dir: Path, **options: Any) -> dict[str, Any]:
    """DISPATCH POINT for whole-slide files (the WSI feature): tile, score and summarise each slide.

    ``histotoken predict`` calls this with the slides among its inputs; ``options`` are the
    slide options of the command line (annotations, labels, tiling). Returns what
    :func:`histotoken.engine.slides.predict_slides` returns.
    """
    from histotoken.engine.slides import predict_slides

    return predict_slides(run_dir, list(slides), out_dir, **options)


# --------------------------------------------------------------------------- scoring


class _ViewDataset(Dataset):
    """(view, 0) pairs: every image in each of ``views``, image-major (item ``i * V + v`` is view ``v`` of image ``i``).

    A view is ``(quarter_turns, flip)``: the image flipped horizontally (when ``flip``), then turned
    ``quarter_turns`` x 90 degrees. All views go through one prediction pass (one Trainer, one loader).
    """

    def __init__(self, images: torch.Tensor, views: Sequence[tuple[int, bool]] = DIHEDRAL_VIEWS[:1]) -> None:
        self.images = images
        self.views = tuple(views)

    def __len__(self) -> int:
        return len(self.images) * len(self.views)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image_index, view_index = divmod(index, len(self.views))
        quarter_turns, flip = self.views[view_index]
        image = self.images[image_index]  # (3, S, S)
        if flip:
            image = image.flip(-1)
        if quarter_turns:
            image = torch.rot90(image, quarter_turns, dims=(-2, -1))
        return image, 0


def dihedral_probabilities(
    model: torch.nn.Module, images: torch.Tensor, *, tta: bool, mean: Sequence[float], std: Sequence[float],
    **inference: Any,
) -> torch.Tensor:
    """(N, C) softmax probabilities of uint8 (N, 3, S, S) images; with ``tta`` the mean over 8 dihedral views.

    One prediction pass scores every view of every image (N x 8 items).
    """
    from histotoken.engine.inference import predict_logits

    views = DIHEDRAL_VIEWS if tta else DIHEDRAL_VIEWS[:1]
    logits = predict_logits(model, _ViewDataset(images, views), mean=mean, std=std, **inference)  # (N * V, C)
    probabilities = torch.softmax(logits.float(), dim=1)
    return probabilities.view(len(images), len(views), -1).mean(dim=1)  # (N, V, C) -> (N, C)


def inference_settings(run_dir: Path, img_size: int, accelerator: str | None = None) -> dict[str, Any]:
    """The run's accelerator and precision (config.yaml), resolved for this machine; one device."""
    from histotoken.engine.evaluate import run_settings
    from histotoken.engine.inference import resolve_accelerator
    from histotoken.engine.precision import resolve_precision

    config = run_settings(run_dir)
    accelerator = resolve_accelerator(accelerator or config.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        logger.warning("the run used accelerator %r but no GPU is available here: predicting on the CPU", accelerator)
        accelerator = "cpu"
    precision = config.get("precision", "auto")
    if accelerator == "cpu" and precision == "16-mixed":
        precision = "auto"  # fp16 autocast is a GPU setting; pick what this CPU does best
    return {"accelerator": accelerator, "precision": resolve_precision(precision, accelerator, img_size)}


def predict_images(
    run_dir: str | Path,
    files: Sequence[str | Path],
    *,
    tta: bool = False,
    batch_size: int = 64,
    accelerator: str | None = None,
    num_workers: int = 0,
) -> pd.DataFrame:
    """One row per file: path, predicted class, ``prob/<class>`` for every class, and an error column.

    Rows keep the order of ``files``. A file that cannot be decoded gets its error and no prediction.
    """
    from histotoken.data.dataset import load_image
    from histotoken.data.stain import saved_stain_normaliser
    from histotoken.data.transforms import model_normalisation
    from histotoken.engine.evaluate import load_best_model

    run_dir = Path(run_dir)
    model, meta = load_best_model(run_dir)
    class_names = list(meta["class_names"])
    img_size = int(meta["img_size"])
    mean, std = model_normalisation(model)
    normaliser, _ = saved_stain_normaliser(run_dir)
    inference = dict(inference_settings(run_dir, img_size, accelerator), batch_size=batch_size, num_workers=num_workers)
    logger.info("predicting %d images with %s (%s, %s)%s", len(files), meta["model_name"],
                inference["accelerator"], inference["precision"], " with 8-view TTA" if tta else "")

    probabilities = np.full((len(files), len(class_names)), np.nan, dtype=np.float32)
    errors = [""] * len(files)
    for start in range(0, len(files), CHUNK_IMAGES):
        decoded, rows = [], []
        for row in range(start, min(start + CHUNK_IMAGES, len(files))):
            try:
                image = load_image(str(files[row]), img_size)  # (3, S, S) uint8, as in training
                if normaliser is not None:
                    image = normaliser.normalise_or_keep(image, str(files[row]))
                decoded.append(image)
                rows.append(row)
            except ValueError as error:
                logger.warning("not scored: %s", error)
                errors[row] = str(error)
        if decoded:
            scored = dihedral_probabilities(model, torch.stack(decoded), tta=tta, mean=mean, std=std, **inference)
            probabilities[rows] = scored.numpy()
    return prediction_table(files, class_names, probabilities, errors)


def prediction_table(
    files: Sequence[str | Path], class_names: Sequence[str], probabilities: np.ndarray, errors: Sequence[str]
) -> pd.DataFrame:
    """The predict CSV as a DataFrame (columns named in histotoken.formats)."""
    path_column, class_column = PREDICT_COLUMNS
    scored = ~np.isnan(probabilities).any(axis=1)
    best = np.nan_to_num(probabilities, nan=-1.0).argmax(axis=1)  # (N,); rows with an error are blanked below
    table = pd.DataFrame({
        path_column: [str(path) for path in files],
        class_column: [class_names[int(i)] if ok else "" for i, ok in zip(best, scored)],
    })
    for index, name in enumerate(class_names):
        table[f"{PROBABILITY_PREFIX}{name}"] = probabilities[:, index]
    table[PREDICT_ERROR_COLUMN] = list(errors)
    return table
