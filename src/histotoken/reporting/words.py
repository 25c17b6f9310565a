"""The words a report uses for its data: "patients" and "tumour class" for BreakHis, "images" for CIFAR-10, ...

The kind of data comes from the study's files only: a run's ``config.yaml`` when it names a kind,
then ``dataset.json`` (the grid records the detected source there), then ``spec.yaml``. Older folders say ``auto`` or nothing; then the frozen
splits tell: CIFAR-10 and tile keys (``<file>.bin#<n>``, ``<table>.parquet#<n>``: each source's
``key_suffix``) name their source, and magnifications all in {40, 100, 200, 400} mean BreakHis.
Anything else gets ImageFolder's words.

Section texts are written in BreakHis's words; :func:`blocks_in_words` puts the prose of every block
(paragraphs, notes, headings, captions, column names; never table cells, which hold data and settings)
in the data's words ("patients" -> "images", "tumour class" -> "class", "magnification" -> "domain"),
so a CIFAR-10 report never speaks of patients or magnifications.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

import pandas as pd

from histotoken.formats import KEY_SEPARATOR

if TYPE_CHECKING:
    from histotoken.data.sources import SourceWords
    from histotoken.reporting.study import StudyFiles

AUTO = "auto"
BREAKHIS = "breakhis"
GENERIC = "imagefolder"
BREAKHIS_MAGNIFICATIONS = {40, 100, 200, 400}
CONFIG_KIND_KEYS = ("data_kind", "data_format")  # run config.yaml keys that may name the resolved kind


def data_kind(study: StudyFiles) -> str:
    """The study's kind of data (breakhis, imagefolder, cifar10, tiles), from its files alone."""
    from histotoken.formats import RunPaths
    from histotoken.reporting.study import read_yaml_mapping

    for _, run_dir in study.run_folders():
        config = read_yaml_mapping(RunPaths(run_dir).config) or {}
        kind = _named_kind(config.get(key) for key in CONFIG_KIND_KEYS)
        if kind:
            return kind
        if config:
            break  # the runs share one data folder: one config saying "auto" is enough
    kind = _named_kind([(study.dataset or {}).get("data_format"), (study.spec or {}).get("data_format")])
    if kind:
        return kind
    return infer_kind(list(study.split_files.values()), (study.dataset or {}).get("counts") or [])


def _named_kind(values: Iterable[Any]) -> str | None:
    for value in values:
        if isinstance(value, str) and value and value != AUTO:
            return value
    return None


def infer_kind(splits: list[pd.DataFrame], counts: list[dict]) -> str:
    """The kind of data behind split tables (and dataset.json counts) written without a recorded kind."""
    magnifications: set[Any] = set()
    for frame in splits:
        if "path" in frame.columns and len(frame):
            kind = _kind_of_key(str(frame["path"].iloc[0]))
            if kind:
                return kind
        if "magnification" in frame.columns:
            magnifications |= set(pd.to_numeric(frame["magnification"], errors="coerce"))
    magnifications |= {pd.to_numeric(row.get("magnification"), errors="coerce") for row in counts}
    if magnifications and magnifications <= BREAKHIS_MAGNIFICATIONS:
        return BREAKHIS
    return GENERIC


def _kind_of_key(path: str) -> str | None:
    """The source whose index keys look like ``path`` (``<file>.bin#<n>``: CIFAR-10), None for image files."""
    from histotoken.data.sources import get_source, source_names

    suffix = index_key_suffix(path)
    if suffix is None:
        return None
    return next((name for name in source_names() if get_source(name).key_suffix == suffix), None)


def index_key_suffix(path: str) -> str | None:
    """``.bin`` for a key ``<file>.bin#<record>`` (an image inside a data file), None for an image file."""
    base, separator, record = path.rpartition(KEY_SEPARATOR)
    if not separator or not record.isdigit():
        return None
    return PurePath(base).suffix or None


def words_of(kind: str) -> SourceWords:
    """The data source's words for ``kind`` (ImageFolder's for an unknown kind)."""
    from histotoken.data.sources import words

    return words(kind)


# BreakHis phrase -> (SourceWords field, or literal text), and whether it is swapped only for data without
# magnifications. Longer phrases first ("patients" before "patient").
_PHRASES = (
    (r"tumour classes", "classes_word", False),
    (r"tumour class", "class_word", False),
    (r"patients", "groups", False),
    (r"patient", "group", False),
    (r"BreakHis ", "", False),
    (r"magnifications", "domains", True),
    (r"magnification", "domain", True),
)


# Phrases that say nothing when every image is its own group (CIFAR-10): left out there.
_IMAGE_GROUP_PHRASES = (" (images of one patient are correlated)",)


def in_words(text: str, words: SourceWords) -> str:
    """``text`` (written about BreakHis) in the words of the data: nouns swapped, case kept."""
    if words.group == "patient" and words.class_word == "tumour class" and words.has_magnification:
        return text  # BreakHis's own words
    if words.group == "image":
        for phrase in _IMAGE_GROUP_PHRASES:
            text = text.replace(phrase, "")
    for phrase, replacement, magnification_only in _PHRASES:
        if magnification_only and words.has_magnification:
            continue
        new = getattr(words, replacement, replacement)
        text = re.sub(rf"\b{phrase}", lambda match, new=new: _same_case(match.group(0), new), text,
                      flags=re.IGNORECASE)
    return text


def _same_case(found: str, new: str) -> str:
    return new[:1].upper() + new[1:] if found[:1].isupper() and new else new


def blocks_in_words(blocks: list, words: SourceWords) -> list:
    """Copies of report blocks with their prose in the data's words (table cells and code unchanged)."""
    from histotoken.reporting.blocks import Bullets, Details, FigureBlock, Heading, Note, Paragraph, Table

    def say(text: str) -> str:
        return in_words(text, words)

    translated = []
    for block in blocks:
        if isinstance(block, Paragraph) and block.verbatim:
            pass
        elif isinstance(block, Paragraph | Note | Heading):
            block = dataclasses.replace(block, text=say(block.text))
        elif isinstance(block, Bullets):
            block = dataclasses.replace(block, items=[say(item) for item in block.items])
        elif isinstance(block, Table):
            frame = block.frame.rename(columns=lambda column: say(column) if isinstance(column, str) else column)
            block = dataclasses.replace(block, frame=frame, caption=say(block.caption))
        elif isinstance(block, FigureBlock):
            block = dataclasses.replace(block, caption=say(block.caption), how_to_read=say(block.how_to_read))
        elif isinstance(block, Details):
            block = dataclasses.replace(block, summary=say(block.summary), blocks=blocks_in_words(block.blocks, words))
        translated.append(block)
    return translated
