"""Embeddings from a frozen timm backbone: ``histotoken embed DATA --model NAME --out FEATURES``.

The backbone is ``timm.create_model(name, num_classes=0)`` (through
:func:`histotoken.models.factory.create_model`, so histotoken's families, ``--weights FILE`` and the
fast offline failure of ``--pretrained`` come with it): ``model(x)`` is then ``forward_features`` plus
the model's own pooling. Images are preprocessed as the model's pretrained config says
(``timm.data.resolve_data_config`` + ``create_transform``: input size, interpolation, crop, mean/std),
in evaluation mode, without gradients, in batches.

Features are computed once per (backbone, weights, data, preprocessing, merging): their hash is the
folder's ``feature_key``. A re-run with the same inputs reuses every file; a killed extraction
resumes per slide (each slide file is renamed into place when complete, and a slide whose file exists
with the same key and tile table is skipped). See :mod:`histotoken.features.store` for the layout.

With ``merge_r`` the ViT backbone merges tokens (ToMe, :func:`histotoken.models.apply_token_merging`)
during extraction; on a sample, the speed of the merged and unmerged backbone and the cosine
similarity of their features are measured side by side (:func:`compare_merging`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histotoken.features import store

logger = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0
FEATURE_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class EmbedSettings:
    model: str
    weights: str | None = None
    pretrained: bool = False
    img_size: int | None = None  # default: the model's pretrained input size
    merge_r: int = 0
    batch_size: int = 64
    num_workers: int = 0
    device: str = "auto"
    data_format: str = "auto"
    groups: str | None = None  # ImageFolder: image -> patient CSV (as in `histotoken index --groups`)
    merge_sample: int = 32  # images timed and compared for --merge-r


@dataclasses.dataclass
class EmbedResult:
    out: Path
    manifest: dict[str, Any]
    computed: list[str]  # slide names (or "features" for an image set) computed in this call
    reused: list[str]
    merge: dict[str, float] | None


# --------------------------------------------------------------------------- backbone and preprocessing


def create_backbone(
    model: str, weights: str | Path | None = None, pretrained: bool = False, img_size: int | None = None
) -> nn.Module:
    """The frozen backbone ``timm.create_model(name, num_classes=0)`` in eval mode (seeded when randomly initialised)."""
    from histotoken.models.factory import create_model
    from histotoken.models.pretrained import PretrainedWeightsError

    if weights and pretrained:
        raise ValueError("give either --weights FILE or --pretrained, not both")
    torch.manual_seed(RANDOM_INIT_SEED)  # random weights (tests, throughput) are the same in every run
    try:
        backbone = create_model(model, num_classes=0, img_size=img_size, pretrained=pretrained, weights=weights)
    except PretrainedWeightsError as error:
        reason = str(error).splitlines()[0].split(". ")[0]
        raise ValueError(
            f"{reason}. Offline, download the weights elsewhere and pass them with --weights FILE "
            "(.safetensors or a timm checkpoint)"
        ) from None
    if int(getattr(backbone, "num_classes", 0) or 0) != 0:
        raise ValueError(f"model {model!r} kept a classifier with num_classes=0; it cannot serve as a backbone")
    return backbone.eval()


def preprocessing(backbone: nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """The model's pretrained preprocessing (timm's resolve_data_config), as JSON-ready values."""
    from timm.data import resolve_data_config

    args = {"input_size": (3, int(img_size), int(img_size))} if img_size else {}
    config = resolve_data_config(args, model=backbone)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def make_transform(config: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (3, H, W) tensor -> float (3, S, S) tensor, through timm's evaluation transform."""
    from timm.data import create_transform
    from torchvision.transforms.functional import to_pil_image

    timm_config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    transform = create_transform(**timm_config, is_training=False)
    return lambda image: transform(to_pil_image(image))


class _KeyedImages(torch.utils.data.Dataset):
    def __init__(self, keys: Sequence[str], transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.keys = list(keys)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> torch.Tensor:
        from histotoken.data.sources import read_image

        return self.transform(read_image(self.keys[index]))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.inference_mode()
def extract(
    backbone: nn.Module, keys: Sequence[str], transform: Callable, batch_size: int = 64,
    num_workers: int = 0, device: torch.device | str = "cpu",
) -> np.ndarray:
    """Features (N, D) float32 of the images behind ``keys``, in order."""
    loader = torch.utils.data.DataLoader(
        _KeyedImages(keys, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    backbone = backbone.to(device).eval()
    blocks = [backbone(batch.to(device)).float().cpu().numpy() for batch in loader]
    if not blocks:
        return np.zeros((0, int(backbone.num_features)), np.float32)
    return np.concatenate(blocks).astype(np.float32)


# --------------------------------------------------------------------------- token merging comparison


@torch.inference_mode()
def compare_merging(backbone: nn.Module, images: torch.Tensor, r: int) -> dict[str, float]:
    """Merge ``r`` tokens per block in ``backbone`` (left merged) and compare with the unmerged backbone
    on ``images``: images per second of each (timed side by side, after one warm-up pass each),
    their ratio, and the mean cosine similarity of the two feature sets."""
    from histotoken.models.token_merging import apply_token_merging, remove_token_merging

    remove_token_merging(backbone)
    backbone.eval()
    backbone(images[:1])  # warm-up
    start = time.perf_counter()
    unmerged = backbone(images).float()
    unmerged_s = time.perf_counter() - start
    apply_token_merging(backbone, int(r))
    backbone(images[:1])
    start = time.perf_counter()
    merged = backbone(images).float()
    merged_s = time.perf_counter() - start
    cosine = torch.nn.functional.cosine_similarity(unmerged, merged, dim=1).mean().item()
    n = len(images)
    return {
        "r": int(r), "sample": n,
        "tiles_per_s_unmerged": n / max(unmerged_s, 1e-9), "tiles_per_s_merged": n / max(merged_s, 1e-9),
        "speedup": unmerged_s / max(merged_s, 1e-9), "cosine_similarity": float(cosine),
    }


# --------------------------------------------------------------------------- identity of a feature folder


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_identity(settings: EmbedSettings, backbone: nn.Module) -> str:
    """What the weights are: a file's sha256, the hub weights' name, or the seeded random initialisation."""
    if settings.weights:
        return f"file:{Path(settings.weights).name}:sha256:{_file_sha256(Path(settings.weights))}"
    if settings.pretrained:
        cfg = getattr(backbone, "pretrained_cfg", {}) or {}
        return f"pretrained:{cfg.get('hf_hub_id') or cfg.get('architecture', settings.model)}:{cfg.get('tag', '')}"
    return f"random-init:seed{RANDOM_INIT_SEED}"


def feature_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _table_signature(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _tile_size_level0(tiles_root: Path, slide: str, table: Any) -> int:
    """Level-0 pixels one tile spans: tile_size * tile mpp / slide mpp (the slide's record), 0 when unknown."""
    from histotoken import formats

    record = formats.TilePaths(tiles_root).record(slide)
    try:
        slide_mpp = float(json.loads(record.read_text()).get("slide_mpp") or 0)
        return int(round(float(table["tile_size"].iloc[0]) * float(table["mpp"].iloc[0]) / slide_mpp))
    except (OSError, ValueError, KeyError, IndexError, ZeroDivisionError, TypeError):
        return 0


# --------------------------------------------------------------------------- the command's work


def embed(data: str | Path, out: str | Path, settings: EmbedSettings) -> EmbedResult:
    """Embed every image (or every slide's tiles) of ``data`` into ``out``; reuse what is already there."""
    from histotoken import formats
    from histotoken.data.sources import detect_format

    data = Path(data).expanduser().resolve()
    out = Path(out).expanduser()
    kind = detect_format(data, settings.data_format)
    backbone = create_backbone(settings.model, settings.weights, settings.pretrained, settings.img_size)
    config = preprocessing(backbone, settings.img_size)
    transform = make_transform(config)
    device = resolve_device(settings.device)
    identity = {
        "version": FEATURE_FORMAT_VERSION, "backbone": settings.model, "weights": weights_identity(settings, backbone),
        "data": str(data), "data_format": kind, "groups": settings.groups, "preprocessing": config, "merge_r": int(settings.merge_r),
    }
    key = feature_key(identity)
    manifest_path = out / store.MANIFEST
    if manifest_path.is_file():
        old = store.read_manifest(out)
        if old.get("feature_key") != key:
            raise ValueError(
                f"{out} holds features of another backbone, weights, data or preprocessing "
                f"({old.get('backbone')}, {old.get('weights')}); give another --out or delete {out}"
            )
    out.mkdir(parents=True, exist_ok=True)
    if kind == "tiles":
        units = [(table.stem, table) for table in formats.TilePaths(data).tables()]
        if not units:
            raise ValueError(f"{data} has no tile tables (tiles/*.parquet); run `histotoken tile` first")
    else:
        from histotoken.data.index import load_index

        indexed = load_index(data, data_format=kind, groups=settings.groups)
        units = [("features", None)]

    attrs_common = {
        "backbone": settings.model, "weights": identity["weights"], "preprocessing": json.dumps(config),
        "feature_key": key, "merge_r": int(settings.merge_r),
    }
    index_source = _index_signature(indexed.frame) if kind != "tiles" else None
    todo = [(name, table) for name, table in units if not _is_done(out, name, table, key, index_source)]
    merge = old_merge(out) if settings.merge_r and not todo else None
    if settings.merge_r and merge is None:  # measured before extraction, which then runs merged
        merge = _merge_sample(backbone, data, kind, units, transform, settings, device)
    pending = {name for name, _ in todo}
    computed, reused = [], [name for name, _ in units if name not in pending]
    for name, table in todo:
        if table is None:
            _embed_image_set(backbone, data, kind, indexed, out, transform, settings, device,
                             {**attrs_common, "source": index_source})
        else:
            _embed_slide(backbone, data, name, table, out, transform, settings, device, attrs_common)
        computed.append(name)
    dim = int(backbone.num_features)
    manifest = {
        **identity, "feature_key": key, "dim": dim, "kind": store.KIND_SLIDES if kind == "tiles" else store.KIND_IMAGES,
        "slides": [name for name, _ in units] if kind == "tiles" else [],
        "files": [f"{name}{store.SLIDE_SUFFIX}" for name, _ in units],
        "merge": merge,
    }
    store.write_manifest(out, manifest)
    logger.info("%d feature files computed, %d reused, in %s", len(computed), len(reused), out)
    return EmbedResult(out, manifest, computed, reused, merge)


def old_merge(out: Path) -> dict[str, float] | None:
    """The merge comparison an earlier run recorded (kept when everything is reused)."""
    try:
        return store.read_manifest(out).get("merge")
    except FileNotFoundError:
        return None


def _index_signature(frame: Any) -> str:
    """An image set's identity: its index keys (images added or removed change it)."""
    return hashlib.sha256("\n".join(frame["path"].astype(str)).encode()).hexdigest()[:16]


def _is_done(out: Path, name: str, table: Path | None, key: str, index_source: str | None = None) -> bool:
    path = out / f"{name}{store.SLIDE_SUFFIX}"
    if not path.is_file():
        return False
    attrs = store.read_attrs(path)
    if attrs.get("feature_key") != key:
        return False
    source = _table_signature(table) if table is not None else index_source
    return attrs.get("source") == source


def _merge_sample(backbone, data, kind, units, transform, settings, device) -> dict[str, float]:
    if kind == "tiles":
        import pandas as pd

        from histotoken.formats import KEY_SEPARATOR

        keys = []
        for _, table in units:
            rows = len(pd.read_parquet(table, columns=["x"]))
            keys.extend(f"{table}{KEY_SEPARATOR}{row}" for row in range(rows))
            if len(keys) >= settings.merge_sample:
                break
    else:
        from histotoken.data.index import load_index

        keys = list(load_index(data, data_format=kind, groups=settings.groups).frame["path"])
    keys = keys[: settings.merge_sample]
    dataset = _KeyedImages(keys, transform)
    images = torch.stack([dataset[i] for i in range(len(dataset))]).to(device)
    result = compare_merging(backbone.to(device), images, settings.merge_r)
    logger.info(
        "token merging r=%d on %d images: %.1f vs %.1f images/s (%.2fx), feature cosine similarity %.4f",
        result["r"], result["sample"], result["tiles_per_s_merged"], result["tiles_per_s_unmerged"],
        result["speedup"], result["cosine_similarity"],
    )
    return result


def _embed_image_set(backbone, data, kind, result, out, transform, settings, device, attrs) -> None:
    frame = result.frame.reset_index(drop=True)
    if result.skipped:
        logger.warning("%d images could not be read and have no features (see `histotoken index %s`)", len(result.skipped), data)
    logger.info("embedding %d images of %s with %s", len(frame), data, settings.model)
    features = extract(backbone, list(frame["path"]), transform, settings.batch_size, settings.num_workers, device)
    store.write_image_features(out / store.IMAGE_SET_FILE, features, frame, {**attrs, "data": str(data), "data_format": kind})


def _embed_slide(backbone, data, slide, table_path, out, transform, settings, device, attrs) -> None:
    import pandas as pd

    from histotoken.formats import KEY_SEPARATOR

    table = pd.read_parquet(table_path)
    keys = [f"{table_path}{KEY_SEPARATOR}{row}" for row in range(len(table))]
    logger.info("embedding %d tiles of slide %s", len(keys), slide)
    features = extract(backbone, keys, transform, settings.batch_size, settings.num_workers, device)
    labels = table["label"].fillna("").astype(str).tolist() if "label" in table else [""] * len(table)
    patient = str(table["patient_id"].iloc[0]) if "patient_id" in table and len(table) else ""
    store.write_slide_features(
        out / f"{slide}{store.SLIDE_SUFFIX}", features, table[["x", "y"]].to_numpy(), labels,
        {**attrs, "slide": slide, "patient_id": patient, "tile_size_level0": _tile_size_level0(data, slide, table),
         "source": _table_signature(table_path), "tile_table": str(table_path)},
    )
