"""Report section "What the models look at": the figures and faithfulness scores of `histotoken explain`.

Reads, for every run of the study, ``runs/<run>/explain/<domain>/explain.json`` and the PNG figures it
names (written by :func:`histotoken.explain.run.explain_run`); nothing is recomputed here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from histotoken.formats import EXPLAIN_DIR, EXPLAIN_SCORES
from histotoken.reporting import tables
from histotoken.reporting.blocks import Details, Note, Paragraph, Table
from histotoken.reporting.formatting import MISSING, file_name, format_number
from histotoken.reporting.sections.context import ReportSection, SectionContext

logger = logging.getLogger(__name__)

METHOD_NAMES = {
    "rollout": "attention rollout",
    "tokenlearner": "TokenLearner maps (mean of the S maps)",
    "scorer": "CNN scorer importance",
    "gradcam": "Grad-CAM",
}
# figure key -> (caption, how to read it); "outcomes" covers every outcomes_<method> figure.
FIGURE_TEXT = {
    "per_image": (
        "Explained test images with each method's map.",
        "Each image's caption gives its true class, the predicted class and the predicted probability; "
        "the panels to its right overlay each method's map on its own scale (blue = least, red = most "
        "important patch for the prediction).",
    ),
    "outcomes": (
        "Most confident correct images and most confident errors per class ({method}).",
        "Each panel is titled with a class and an outcome: TP is the most confident correct image of the class, "
        "FP the most confident image wrongly called this class, FN the most confident image of this class called "
        "something else; the second line gives the predicted class and its probability. A class and outcome "
        "without such an image among the explained ones has no panel.",
    ),
    "token_maps": (
        "Where each learned token of the TokenLearner pools from.",
        "One row per image; each panel is one of the S spatial maps with which the TokenLearner pooled the "
        "patch grid into a token (bright = high weight).",
    ),
    "kept_patches": (
        "The CNN scorer's importance map and the patches the ViT read.",
        "Middle: the scorer's importance per patch; right: the image with the pruned patches darkened, so "
        "the bright patches are the only ones the transformer saw.",
    ),
    "merge_sources": (
        "Which input patches each token holds after token merging.",
        "Patches of one colour were merged into one token by the last block; large areas of one colour are "
        "regions the model treated as redundant.",
    ),
    "tsne": (
        "t-SNE of the pooled features of the test images.",
        "Each point is a test image, placed so that images with similar features lie close; left coloured "
        "by class (separated colours = features that tell classes apart), right by magnification (separated "
        "colours = the features change with magnification, the shift this study measures).",
    ),
    "faithfulness": (
        "Deletion and insertion curves, averaged over the explained images.",
        "Left: the predicted class's probability as the most important patches (by each map) are blurred; a "
        "faithful map makes it fall faster than the grey random order. Right: patches revealed on a blurred "
        "image; a faithful map makes it rise faster than random.",
    ),
}


def build(context: SectionContext) -> list:
    blocks: list = [Paragraph(
        "Explanation maps of each run that has them (`histotoken explain`, or an `explain:` block in the "
        "grid spec), with a test of whether each map is faithful: deletion and insertion curves (Petsiuk "
        "et al., RISE, BMVC 2018). Deletion blurs patches in the order of the map and follows the predicted "
        "class's probability (lower area = better); insertion reveals them on a blurred image (higher area "
        "= better). Both are compared with random patch orders; a method that beats random on neither "
        "is marked NO BETTER THAN RANDOM."
    )]
    found = False
    for run_id, run_dir in context.study.run_folders():
        for scores_path in sorted((run_dir / EXPLAIN_DIR).glob(f"*/{EXPLAIN_SCORES}")):
            scores = tables.read_json_if_present(scores_path)
            if not isinstance(scores, dict):
                blocks.append(Note(f"{scores_path} is unreadable: no explanations shown for {run_id}."))
                continue
            summary = f"{run_id}: {scores.get('model_name', MISSING)} on {scores.get('domain', MISSING)}"
            blocks.append(Details(summary, _run_blocks(context, run_id, scores, scores_path.parent), open=not found))
            found = True
    if not found:
        blocks.append(Note("No run of this study has explanations. Run `histotoken explain RUN_DIR --domain D` "
                           "on a run folder, or add an `explain:` block to the grid spec, then rebuild the report."))
    return blocks


def faithfulness_table(faithfulness: dict) -> pd.DataFrame:
    rows = []
    for method, score in faithfulness.items():
        if score.get("verdict"):  # with the number of images and the paired intervals (histotoken explain)
            verdict = score["verdict"]
        elif score.get("no_better_than_random"):
            verdict = "NO BETTER THAN RANDOM"
        elif score.get("better_than_random_deletion") and score.get("better_than_random_insertion"):
            verdict = "better than random on both"
        else:
            verdict = "better than random on " + ("deletion" if score.get("better_than_random_deletion") else "insertion")
        rows.append({
            "method": METHOD_NAMES.get(method, method),
            "deletion AUC": format_number(score.get("deletion_auc"), 3),
            "random deletion AUC": format_number(score.get("random_deletion_auc"), 3),
            "insertion AUC": format_number(score.get("insertion_auc"), 3),
            "random insertion AUC": format_number(score.get("random_insertion_auc"), 3),
            "verdict": verdict,
        })
    return pd.DataFrame(rows)


def _run_blocks(context: SectionContext, run_id: str, scores: dict, folder: Path) -> list:
    blocks: list = [Paragraph(
        f"{scores.get('n_images', MISSING)} of {scores.get('n_test_images', MISSING)} test images at "
        f"{scores.get('domain', MISSING)} explained; faithfulness curves with {scores.get('steps', MISSING)} steps "
        f"and {scores.get('random_orders', MISSING)} random orders per image."
    )]
    faithfulness = scores.get("faithfulness") or {}
    if faithfulness:
        blocks.append(Table(faithfulness_table(faithfulness), "Areas under the deletion and insertion curves "
                                                              "(mean over the explained images)."))
    else:
        blocks.append(Note("This model has no saliency map to score (e.g. token merging shows merged tokens only)."))
    for key, name in (scores.get("figures") or {}).items():
        path = folder / name
        if not path.is_file():
            blocks.append(Note(f"{path} is missing."))
            continue
        text_key = "outcomes" if key.startswith("outcomes_") else key
        caption, how = FIGURE_TEXT.get(text_key, (key.replace("_", " "), ""))
        method = METHOD_NAMES.get(key.removeprefix("outcomes_"), key.removeprefix("outcomes_"))
        blocks.append(context.png_figure(
            f"explain_{file_name(run_id)}_{scores.get('domain', '')}_{key}", path.read_bytes(),
            f"{run_id}: {caption.format(method=method)}", how,
        ))
    return blocks


SECTION = ReportSection("explanations", "What the models look at", build)
