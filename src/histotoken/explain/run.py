"""``explain_run``: a finished run's explanations on one test domain -> PNG figures and explain.json.

What it does, in order (the seconds each part took go into explain.json under ``timing_s``):

1. loads the run's best model and its frozen split's test images (every magnification, for t-SNE);
2. one forward pass over them gives the pooled features and the predictions;
3. picks up to ``n`` images of the test domain: per class, the most confident true positives, false
   positives and false negatives, taken in turn;
4. computes each method's map for them (:func:`methods_for` says which methods fit the model);
5. deletion and insertion curves against random patch orders (:mod:`histotoken.explain.faithfulness`);
6. t-SNE of the pooled features, and the figures.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histotoken.explain import faithfulness, figures
from histotoken.explain.maps import CNN_GRID, model_grid
from histotoken.formats import EXPLAIN_FIGURES, EXPLAIN_SCORES, RunPaths
from histotoken.io import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

METHOD_CHOICES = ("auto", "rollout", "gradcam", "tokens", "all")
OUTCOMES = ("TP", "FP", "FN")
RANDOM = "random"
DEFAULT_N = 16
MAX_TOKEN_FIGURE_ROWS = 6
MAX_TSNE_POINTS = 3000


def model_kind(model: nn.Module) -> str:
    """``cnnprune``, ``tokenlearner_vit``, ``tokenmixer``, ``vit`` (timm ViT/DeiT), ``vit_merged`` or ``other``."""
    from timm.models.vision_transformer import VisionTransformer

    from histotoken.models.cnnprune_vit import CNNPruneViT
    from histotoken.models.tokenlearner_vit import TokenLearnerViT
    from histotoken.models.tokenmixer import TokenMixer

    if isinstance(model, CNNPruneViT):
        return "cnnprune"
    if isinstance(model, TokenLearnerViT):
        return "tokenlearner_vit"
    if isinstance(model, TokenMixer):
        return "tokenmixer"
    if isinstance(model, VisionTransformer):
        return "vit_merged" if int(getattr(model, "merge_r", 0) or 0) > 0 else "vit"
    return "other"


def methods_for(model: nn.Module, method: str = "auto") -> list[str]:
    """The map methods to compute for ``model``: ``rollout``, ``tokenlearner``, ``scorer``, ``gradcam``.

    A ViT with token merging gets rollout through its merges (and a figure of the merged tokens).

    ``auto``: the model's own explanation (rollout for ViT/DeiT, the token maps of token-efficient
    models, Grad-CAM for everything else); ``all``: those plus Grad-CAM; ``rollout``, ``gradcam`` and
    ``tokens`` ask for one kind and fail with a clear message when the model has none.
    """
    if method not in METHOD_CHOICES:
        raise ValueError(f"unknown explanation method {method!r}; choose one of {', '.join(METHOD_CHOICES)}")
    kind = model_kind(model)
    token_methods = {"cnnprune": ["scorer"], "tokenlearner_vit": ["tokenlearner"], "tokenmixer": ["tokenlearner"]}
    rollout_ok = kind in ("vit", "vit_merged") or (kind == "tokenlearner_vit" and model.learner_after > 0)
    gradcam_ok = kind not in ("vit_merged", "cnnprune", "tokenmixer", "tokenlearner_vit")
    native = token_methods.get(kind, []) + (["rollout"] if rollout_ok else [])
    if kind == "other":
        native = ["gradcam"]
    if method == "auto":
        chosen = native
    elif method == "all":
        chosen = native + (["gradcam"] if gradcam_ok and "gradcam" not in native else [])
    elif method == "rollout":
        chosen = ["rollout"] if rollout_ok else []
    elif method == "tokens":
        chosen = token_methods.get(kind, [])
    else:
        chosen = ["gradcam"] if gradcam_ok else []
    if not chosen:
        raise ValueError(f"--method {method} does not apply to {type(model).__name__}; use --method auto")
    return chosen


def compute_maps(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, methods: list[str],
                 grid_size: tuple[int, int]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Maps (B, gh, gw) per method, and the extras the token figures need (token maps, kept mask, sources)."""
    from histotoken.explain.gradcam import gradcam_maps
    from histotoken.explain.rollout import rollout_maps
    from histotoken.explain.token_maps import pruning_maps, tokenlearner_maps, tokenlearner_summary

    maps: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    for method in methods:
        if method == "rollout" and model_kind(model) == "vit_merged":
            from histotoken.explain.tome_sources import merged_rollout_maps

            maps[method] = merged_rollout_maps(model, images, grid_size)  # rollout through the merges
        elif method == "rollout":
            blocks = list(model.blocks)
            if model_kind(model) == "tokenlearner_vit":
                blocks = blocks[: model.learner_after]  # rollout up to the reduction layer
            maps[method] = rollout_maps(model, images, grid_size, blocks)
        elif method == "tokenlearner":
            extras["token_maps"] = tokenlearner_maps(model, images)
            maps[method] = tokenlearner_summary(extras["token_maps"])
        elif method == "scorer":
            maps[method], extras["kept"] = pruning_maps(model, images)
        elif method == "gradcam":
            maps[method] = gradcam_maps(model, images, targets, grid_size)
    if model_kind(model) == "vit_merged":
        from histotoken.explain.tome_sources import merge_sources, source_label_maps

        extras["merge_holders"] = source_label_maps(merge_sources(model, images), grid_size)
    return maps, extras


def select_images(targets: np.ndarray, probabilities: np.ndarray, n: int) -> tuple[list[int], dict]:
    """Up to ``n`` image indices: per class and outcome (TP/FP/FN), the most confident first, taken in turn.

    Returns the chosen indices and ``cells[(class index, outcome)]`` = indices of that cell, most
    confident first (confidence: the probability of the predicted class).
    """
    predictions = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    cells: dict[tuple[int, str], list[int]] = {}
    for c in range(probabilities.shape[1]):
        members = {
            "TP": (targets == c) & (predictions == c),
            "FP": (predictions == c) & (targets != c),
            "FN": (targets == c) & (predictions != c),
        }
        for outcome in OUTCOMES:
            indices = np.flatnonzero(members[outcome])
            cells[(c, outcome)] = [int(i) for i in indices[np.argsort(-confidence[indices], kind="stable")]]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n and any(len(v) > depth for v in cells.values()):
        for outcome in OUTCOMES:  # correct images and errors alternate across classes
            for c in range(probabilities.shape[1]):
                members = cells[(c, outcome)]
                if depth < len(members) and members[depth] not in chosen and len(chosen) < n:
                    chosen.append(members[depth])
        depth += 1
    return chosen, cells


def faithfulness_scores(model: nn.Module, images: torch.Tensor, predictions: list[int],
                        maps: dict[str, torch.Tensor], grid_size: tuple[int, int], steps: int,
                        random_orders: int, seed: int) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Per method: mean deletion/insertion AUC over the images, next to the random-order AUCs, with paired
    intervals over images and a verdict (:func:`histotoken.explain.faithfulness.faithfulness_score`)."""
    num_patches = grid_size[0] * grid_size[1]
    per_method: dict[str, dict[str, list]] = {name: {"deletion": [], "insertion": []} for name in [*maps, RANDOM]}
    for i, image in enumerate(images):
        orders = {name: faithfulness.map_order(maps[name][i]) for name in maps}
        randoms = faithfulness.random_orders(num_patches, random_orders, seed + i)
        orders.update({f"{RANDOM}{j}": order for j, order in enumerate(randoms)})
        curves = faithfulness.perturbation_curves(model, image, orders, grid_size, predictions[i], steps)
        for name, curve in curves.items():
            key = RANDOM if name.startswith(RANDOM) else name
            per_method[key]["deletion"].append(curve.deletion)
            per_method[key]["insertion"].append(curve.insertion)
    mean_curves = {name: {kind: np.mean(values, axis=0) for kind, values in kinds.items()}
                   for name, kinds in per_method.items()}
    aucs = {name: {kind: np.array([faithfulness.auc(c) for c in values]) for kind, values in kinds.items()}
            for name, kinds in per_method.items()}  # per image; the random ones pooled over orders below
    random_per_image = {kind: aucs[RANDOM][kind].reshape(len(images), random_orders).mean(axis=1)
                        for kind in ("deletion", "insertion")}
    scores: dict[str, Any] = {
        name: faithfulness.faithfulness_score(aucs[name]["deletion"], random_per_image["deletion"],
                                              aucs[name]["insertion"], random_per_image["insertion"], seed=seed)
        for name in maps
    }
    return scores, mean_curves


def _to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy().astype(np.uint8)  # (N, 3, H, W) -> (N, H, W, 3)


def explain_run(
    run_dir: str | Path,
    domain: str,
    n: int = DEFAULT_N,
    method: str = "auto",
    out: str | Path | None = None,
    steps: int = faithfulness.DEFAULT_STEPS,
    random_orders: int = faithfulness.DEFAULT_RANDOM_ORDERS,
    seed: int = 0,
    tsne: bool = True,
) -> dict[str, Any]:
    """Explain ``n`` test images of ``domain`` for the run in ``run_dir``; write figures and explain.json.

    Returns the content of explain.json (``figures`` maps a figure key to its file name in ``out``,
    default ``RUN_DIR/explain/<domain>/``). Raises FileNotFoundError/ValueError with a one-line
    message when the run has no best checkpoint or the domain has no test images.
    """
    from histotoken.data.breakhis import is_synthetic
    from histotoken.data.dataset import ImageStore, class_column
    from histotoken.data.domains import domain_name, select_domain
    from histotoken.data.splits import read_split
    from histotoken.data.stain import saved_stain_normaliser
    from histotoken.data.transforms import model_normalisation
    from histotoken.engine.evaluate import load_best_model
    from histotoken.explain.tsne import pooled_features_and_logits, tsne_embedding
    from histotoken.reporting.plots import figure_to_png

    started = time.perf_counter()
    timing: dict[str, float] = {}
    paths = RunPaths(Path(run_dir))
    domain = domain_name(domain)
    out_dir = Path(out) if out is not None else paths.explain_dir(domain)
    torch.manual_seed(seed)

    model, meta = load_best_model(paths.root)
    methods = methods_for(model, method)
    split = read_split(paths.splits)
    test_all = split[split["split"] == "test"].reset_index(drop=True)
    if test_all.empty:
        raise ValueError(f"{paths.splits} has no test images; explanations need a test split")
    # the run's decoded store (same universe and stain normalisation as its evaluation): nothing decoded again
    preprocess, preprocess_key = saved_stain_normaliser(paths.root)
    store = ImageStore.build(
        test_all, meta["img_size"], universe=split, preprocess=preprocess, preprocess_key=preprocess_key
    )
    frame = store.frame
    names = list(meta["class_names"])
    column = meta.get("class_column") or class_column(meta["task"])
    lookup = {name: i for i, name in enumerate(names)}
    targets_all = frame[column].map(lookup).to_numpy()
    in_domain = frame.index.isin(select_domain(frame, domain, f"the test split of {paths.splits}").index)
    mean, std = model_normalisation(model)
    timing["load"] = time.perf_counter() - started

    tick = time.perf_counter()
    features, logits = pooled_features_and_logits(model, store.images, mean, std)
    probabilities = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    timing["features"] = time.perf_counter() - tick

    domain_rows = np.flatnonzero(in_domain)
    chosen_local, cells = select_images(targets_all[domain_rows], probabilities[domain_rows], n)
    chosen = [int(domain_rows[i]) for i in chosen_local]
    if not chosen:
        raise ValueError(f"no test image of domain {domain} could be explained")
    mean_t = torch.tensor(mean)[None, :, None, None]
    std_t = torch.tensor(std)[None, :, None, None]
    raw = store.images[chosen]  # (n, 3, S, S) uint8
    images = (raw.float() / 255.0 - mean_t) / std_t
    predictions = [int(p) for p in probabilities[chosen].argmax(axis=1)]
    grid = model_grid(model) or CNN_GRID

    tick = time.perf_counter()
    maps, extras = compute_maps(model, images, torch.tensor(predictions), methods, grid)
    timing["maps"] = time.perf_counter() - tick

    tick = time.perf_counter()
    scores, mean_curves = ({}, {})
    if maps:
        scores, mean_curves = faithfulness_scores(model, images, predictions, maps, grid, steps, random_orders, seed)
    timing["faithfulness"] = time.perf_counter() - tick

    tick = time.perf_counter()
    embedding = None
    tsne_rows = np.arange(len(frame))
    if tsne and len(frame) >= 3:
        if len(tsne_rows) > MAX_TSNE_POINTS:
            tsne_rows = np.sort(np.random.default_rng(seed).choice(tsne_rows, MAX_TSNE_POINTS, replace=False))
        embedding = tsne_embedding(features[tsne_rows], seed)
    timing["tsne"] = time.perf_counter() - tick

    tick = time.perf_counter()
    pictures = _figures(
        raw, maps, extras, chosen, cells, domain_rows, names, targets_all, probabilities,
        embedding, frame.iloc[tsne_rows], column, mean_curves, meta, domain,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    figure_files = {}
    for key, figure in pictures.items():
        figure_files[key] = key_file = _figure_name(key)
        atomic_write_bytes(out_dir / key_file, figure_to_png(figure))
    timing["figures"] = time.perf_counter() - tick
    timing["total"] = time.perf_counter() - started

    result = {
        "run_dir": str(paths.root),
        "domain": domain,
        "model_name": meta["model_name"],
        "model_kind": model_kind(model),
        "task": meta["task"],
        "class_names": names,
        "methods": list(maps),
        "grid_size": list(grid),
        "n_images": len(chosen),
        "n_test_images": int(in_domain.sum()),
        "n_tsne_images": int(len(tsne_rows)) if embedding is not None else 0,
        "steps": steps,
        "random_orders": random_orders,
        "seed": seed,
        "synthetic": bool(is_synthetic(Path(frame["path"].iloc[0]).parent)),
        "images": [
            {
                "path": str(frame["path"].iloc[row]),
                "target": names[int(targets_all[row])],
                "prediction": names[predictions[k]],
                "probability": float(probabilities[row].max()),
            }
            for k, row in enumerate(chosen)
        ],
        "faithfulness": scores,
        "figures": figure_files,
        "timing_s": {key: round(value, 3) for key, value in timing.items()},
    }
    atomic_write_json(out_dir / EXPLAIN_SCORES, result)
    logger.info("explained %d images of %s with %s in %.1f s: %s", len(chosen), domain,
                ", ".join(maps) or "no map method", timing["total"], out_dir)
    return result


def _figure_name(key: str) -> str:
    if key.startswith("outcomes_"):
        return EXPLAIN_FIGURES["outcomes"].format(method=key.removeprefix("outcomes_"))
    return EXPLAIN_FIGURES[key]


def _figures(raw, maps, extras, chosen, cells, domain_rows, names, targets_all, probabilities,
             embedding, tsne_frame, column, mean_curves, meta, domain) -> dict:
    """Every figure of one explanation, keyed as in ``formats.EXPLAIN_FIGURES``."""
    from histotoken.explain.maps import upsample

    pictures = {}
    size = tuple(raw.shape[-2:])
    shown = _to_uint8_hwc(raw)
    captions = [
        f"true {names[int(targets_all[row])]}\npred {names[int(probabilities[row].argmax())]}"
        f" ({probabilities[row].max():.2f})" for row in chosen
    ]
    upsampled = {name: upsample(value, size).numpy() for name, value in maps.items()}
    if maps:
        pictures["per_image"] = figures.per_image_figure(shown, upsampled, captions)
        position = {row: k for k, row in enumerate(chosen)}
        for name in maps:
            grid_cells = {}
            for (c, outcome), members in cells.items():
                if not members:
                    grid_cells[(names[c], outcome)] = None
                    continue
                row = int(domain_rows[members[0]])
                if row in position:
                    image, saliency = shown[position[row]], upsampled[name][position[row]]
                else:  # a cell image beyond the n explained ones: not in the figure
                    grid_cells[(names[c], outcome)] = None
                    continue
                predicted = names[int(probabilities[row].argmax())]
                grid_cells[(names[c], outcome)] = (image, saliency, f"{predicted} {probabilities[row].max():.2f}")
            pictures[f"outcomes_{name}"] = figures.outcome_grid_figure(grid_cells, names, OUTCOMES, name)
        pictures["faithfulness"] = figures.faithfulness_figure(mean_curves, RANDOM)
    rows = min(len(chosen), MAX_TOKEN_FIGURE_ROWS)
    if "token_maps" in extras:
        token_maps = torch.nn.functional.interpolate(extras["token_maps"][:rows], size=size, mode="nearest").numpy()
        pictures["token_maps"] = figures.token_maps_figure(
            shown[:rows], token_maps, f"{meta['model_name']}: where each learned token pools from")
    if "kept" in extras:
        pictures["kept_patches"] = figures.kept_patches_figure(
            shown[:rows], upsampled["scorer"][:rows], extras["kept"][:rows].numpy())
    if "merge_holders" in extras:
        holders = torch.nn.functional.interpolate(
            extras["merge_holders"][:rows, None].float(), size=size, mode="nearest")[:, 0].numpy()
        pictures["merge_sources"] = figures.merge_sources_figure(shown[:rows], holders)
    if embedding is not None:
        classes = tsne_frame[column].astype(str).tolist()
        pictures["tsne"] = figures.tsne_figure(
            embedding, classes, tsne_frame["magnification"].astype(str).tolist(),
            f"t-SNE of {meta['model_name']}'s pooled features, test images (trained on {meta['train_domain']})")
    return pictures


# Keys of a grid spec's ``explain:`` block (histotoken.experiments.spec): keyword arguments of explain_run,
# with ``domains`` (a list; default the run's train domain) in place of ``domain``.
EXPLAIN_SPEC_KEYS = ("domains", "n", "method", "steps", "random_orders", "seed", "tsne")


def explain_after_evaluation(run_dir: str | Path, settings: dict[str, Any], default_domain: str) -> list[Path]:
    """The grid's hook: explain a run that was just evaluated, as its spec's ``explain:`` block asks.

    Domains already explained (explain.json present) are skipped, so a resumed grid does not redo them.
    An explanation that fails is logged and skipped: it must not turn a finished run into a failed one.
    """
    settings = {key: value for key, value in settings.items() if key in EXPLAIN_SPEC_KEYS}
    domains = [str(d) for d in (settings.pop("domains", None) or [default_domain])]
    paths = RunPaths(Path(run_dir))
    written = []
    for domain in domains:
        target = paths.explain_dir(domain) / EXPLAIN_SCORES
        if target.is_file():
            continue
        try:
            explain_run(paths.root, domain, **settings)
            written.append(target)
        except (OSError, ValueError, RuntimeError) as error:
            logger.warning("explanations of %s on %s failed: %s", paths.root.name, domain, error)
    return written
