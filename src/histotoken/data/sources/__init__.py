"""Data sources: one module per kind of data folder behind one :class:`DataSource` protocol, and a registry.

Built-in sources (one module each): :mod:`~histotoken.data.sources.breakhis` (BreakHis file-name
grammar), :mod:`~histotoken.data.sources.imagefolder` (``ROOT/<class>/**/<image>``),
:mod:`~histotoken.data.sources.cifar10` (CIFAR-10 binary batches) and
:mod:`~histotoken.data.sources.tiles` (tile tables written by ``histotoken tile``). Each yields the
same index frame (``INDEX_COLUMNS``), so splits, stores and the engine do not care where an image
came from:

- ``path``: a unique string key. A file path for BreakHis and ImageFolder images;
  ``<file>.bin#<record>`` for a CIFAR-10 record; ``<tiles_dir>/tiles/<slide>.parquet#<row>`` for
  a WSI tile. :func:`read_image` reads any of them.
- ``patient_id``: the group that must stay on one side of a split (see each source).
- ``tumor_class`` and ``label``: both hold the class name for non-BreakHis sources.
- ``magnification``: 40/100/200/400 for BreakHis, 0 ("none") elsewhere.

The registry maps a name to a source; the ``--data-format`` choices are ``auto`` plus
:func:`source_names`. Built-in sources are imported only when first used (so that ``--help`` and the
configuration stay light); :func:`register_source` adds another one at run time. Detection
(:func:`detect_format`) asks every source whether it recognises the folder by what identifies it
(a tile folder's summary, CIFAR's batch files, BreakHis's file names), never by folder names
alone; ImageFolder, which any tree of class folders satisfies, is the fallback. See
docs/data_sources.md.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from histotoken.formats import KEY_SEPARATOR

if TYPE_CHECKING:  # pandas and torch are imported by the sources that need them, when they are used
    import pandas as pd
    import torch

logger = logging.getLogger(__name__)

INDEX_COLUMNS = ["path", "patient_id", "tumor_class", "label", "magnification", "width", "height"]
NO_MAGNIFICATION = 0
AUTO = "auto"
FALLBACK_SOURCE = "imagefolder"  # recognises any tree of class folders, so it is asked last


@dataclasses.dataclass
class IndexResult:
    """The index plus every file that was left out and why."""

    frame: pd.DataFrame
    skipped: list[tuple[str, str]]  # (path, reason)
    data_format: str = "breakhis"  # the source's name (see source_names())
    class_names: tuple[str, ...] | None = None  # the data's own classes (None for BreakHis: tasks name them)
    grouped: bool = True  # whether patient_id names real patients/groups (False: every image its own group)


@dataclasses.dataclass(frozen=True)
class SourceWords:
    """How reports and messages speak about a source's groups and classes."""

    group: str = "patient"
    groups: str = "patients"
    class_word: str = "tumour class"
    classes_word: str = "tumour classes"
    has_magnification: bool = True
    description: str = "a BreakHis-style folder"


@runtime_checkable
class DataSource(Protocol):
    """One kind of data folder.

    ``decodes_images``: ``scan`` decodes every image once to check it (slow), so ``data.index``
    caches its result per tree state. ``key_suffix``: the suffix of the file part of this source's
    ``<file>#<record>`` keys ("" when its keys are plain image files).
    """

    name: str
    words: SourceWords
    decodes_images: bool
    key_suffix: str

    def detect(self, root: Path) -> bool:
        """Whether ``root`` holds this kind of data, judged by what identifies it."""
        ...

    def scan(self, root: Path, groups: str | Path | None = None) -> IndexResult:
        """One row per usable image (``INDEX_COLUMNS``); unusable files listed in ``skipped``."""
        ...

    def read(self, key: str) -> torch.Tensor:
        """The image behind an index key as a (3, H, W) uint8 tensor; ValueError naming the key."""
        ...

    def classes(
        self, task: str, root: Path | None = None, frame: pd.DataFrame | None = None
    ) -> tuple[tuple[str, ...], str]:
        """(class names in label order, index column holding them) for ``task``."""
        ...

    def rebase(self, frame: pd.DataFrame, new_root: Path) -> pd.DataFrame:
        """The frame with its keys pointing at another copy of the same data below ``new_root``."""
        ...


# --------------------------------------------------------------------------- registry

_BUILTIN_MODULES = {
    "breakhis": "histotoken.data.sources.breakhis",
    "imagefolder": "histotoken.data.sources.imagefolder",
    "cifar10": "histotoken.data.sources.cifar10",
    "tiles": "histotoken.data.sources.tiles",
}
_REGISTERED: dict[str, DataSource] = {}


def register_source(source: DataSource) -> DataSource:
    """Add (or replace) a source under ``source.name``; it becomes a ``--data-format`` choice."""
    if not isinstance(source, DataSource):
        raise TypeError(f"{source!r} does not implement the DataSource protocol (see histotoken.data.sources)")
    if source.name == AUTO:
        raise ValueError(f"{AUTO!r} is reserved for detection; name the source otherwise")
    _REGISTERED[source.name] = source
    return source


def source_names() -> tuple[str, ...]:
    """Names of every source, built-in first (no source module is imported)."""
    return (*_BUILTIN_MODULES, *(name for name in _REGISTERED if name not in _BUILTIN_MODULES))


def get_source(name: str) -> DataSource:
    """The source registered under ``name``; ValueError listing the choices otherwise."""
    if name not in _REGISTERED and name in _BUILTIN_MODULES:
        register_source(importlib.import_module(_BUILTIN_MODULES[name]).SOURCE)
    if name not in _REGISTERED:
        raise ValueError(f"unknown data format {name!r}; choose {AUTO} or one of {', '.join(source_names())}")
    return _REGISTERED[name]


def words(kind: str) -> SourceWords:
    """The report vocabulary of a source (ImageFolder's for ``auto`` or an unknown kind)."""
    if kind in source_names():
        return get_source(kind).words
    return get_source(FALLBACK_SOURCE).words


def data_format_help() -> str:
    return f"kind of data folder: {AUTO} (default: detected from the folder), " + ", ".join(source_names())


# --------------------------------------------------------------------------- detection


def detect_format(data_root: str | Path, data_format: str = AUTO) -> str:
    """The name of the source that holds ``data_root``; ``data_format`` other than ``auto`` is taken as given.

    Every source but ImageFolder is asked whether it recognises the folder. One yes decides; several
    are an error that names the ``--data-format`` choices; none leaves ImageFolder (class folders
    holding images).
    """
    if data_format != AUTO:
        return get_source(data_format).name  # ValueError for an unknown name
    root = Path(data_root).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"data folder {root} does not exist; give a BreakHis, ImageFolder, CIFAR-10 or tiles folder"
        )
    if not root.is_dir():
        raise ValueError(f"data {root} is a file, not a folder; give the folder that holds the images")
    specific = [name for name in source_names() if name != FALLBACK_SOURCE]
    matches = [name for name in specific if get_source(name).detect(root)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        options = " or ".join(f"--data-format {name}" for name in matches)
        raise ValueError(f"{root} looks like {' and like '.join(matches)}; say which with {options}")
    if get_source(FALLBACK_SOURCE).detect(root):
        return FALLBACK_SOURCE
    raise FileNotFoundError(
        f"{root} does not look like BreakHis (SOB_* image files), an ImageFolder tree (one folder per class "
        "holding images), CIFAR-10 binary batches (data_batch_1.bin ...) or WSI tiles (summary.csv + tiles/). "
        "Check the path, or name the kind with --data-format"
    )


def scan_source(data_root: str | Path, data_format: str = AUTO, groups: str | Path | None = None) -> IndexResult:
    """Index a data folder without the cache (``data.index.load_index`` caches decoding sources)."""
    kind = detect_format(data_root, data_format)
    return get_source(kind).scan(Path(data_root).expanduser().resolve(), groups)


# --------------------------------------------------------------------------- keys and reading


def split_key(key: str) -> tuple[str, int | None]:
    """``file.bin#17`` -> (``file.bin``, 17); a plain path -> (path, None)."""
    base, sep, number = key.rpartition(KEY_SEPARATOR)
    if sep and number.isdigit() and Path(base).suffix in _record_suffixes():
        return base, int(number)
    return key, None


def rebase_record_keys(frame: pd.DataFrame, folder: Path, what: str) -> pd.DataFrame:
    """Point record keys (``<old folder>/<file>#<n>``) at ``folder/<file>#<n>``; ``what`` names the
    record kind in the error for a key that is not one (e.g. ``a tile (<table>.parquet#<row>)``)."""

    def moved(key: str) -> str:
        base, record = split_key(key)
        if record is None:
            raise ValueError(f"split key {key} is not {what}; cannot move it to {folder}")
        return f"{folder / Path(base).name}{KEY_SEPARATOR}{record}"

    frame = frame.copy()
    frame["path"] = frame["path"].astype(str).map(moved)
    return frame


def _record_suffixes() -> set[str]:
    suffixes = {".bin": "cifar10", ".parquet": "tiles"}  # built-ins, known without importing them
    suffixes.update({s.key_suffix: s.name for s in _REGISTERED.values() if s.key_suffix})
    return set(suffixes)


def source_of_key(key: str) -> DataSource:
    """The source whose keys look like ``key``: a record source for ``<file>#<n>``, else plain images."""
    base, record = split_key(key)
    if record is not None:
        suffix = Path(base).suffix
        for name in source_names():
            if name in _REGISTERED and _REGISTERED[name].key_suffix == suffix:
                return _REGISTERED[name]
        return get_source({".bin": "cifar10", ".parquet": "tiles"}[suffix])
    return get_source(FALLBACK_SOURCE)


def read_image(key: str) -> torch.Tensor:
    """Decode the image behind any index key to a (3, H, W) uint8 tensor at its stored size.

    Raises ValueError naming the key when it cannot be read.
    """
    return source_of_key(str(key)).read(str(key))


# --------------------------------------------------------------------------- classes and rebasing


def looks_like_breakhis(frame: pd.DataFrame) -> bool:
    """Rows with BreakHis magnifications (non-BreakHis sources have magnification 0)."""
    from histotoken.data.breakhis import MAGNIFICATIONS

    return bool(len(frame)) and bool(frame["magnification"].isin(MAGNIFICATIONS).all())


def resolve_kind(data: str | Path | None = None, data_format: str = AUTO, frame: pd.DataFrame | None = None) -> str:
    """The source name of some data: detected from ``data`` when given (``data_format`` overrides), else
    ``data_format``, else judged from an index/split ``frame`` (BreakHis magnifications or not)."""
    if data:
        return detect_format(data, data_format)
    if data_format != AUTO:
        return get_source(data_format).name
    if frame is not None:
        return "breakhis" if looks_like_breakhis(frame) else FALLBACK_SOURCE
    raise ValueError("the kind of data needs the data folder or its index/split frame")


def task_classes(
    task: str, data: str | Path | None = None, data_format: str = AUTO, frame: pd.DataFrame | None = None
) -> tuple[tuple[str, ...], str]:
    """(class names in label order, index column holding them) for ``task`` on some data.

    The kind comes from ``data`` when given (``data_format`` overrides detection), else from
    ``data_format``, else from ``frame`` (BreakHis magnifications or not). See each source's
    ``classes``.
    """
    kind = resolve_kind(data, data_format, frame)
    root = Path(data).expanduser().resolve() if data else None
    return get_source(kind).classes(task, root, frame)


def rebase_frame(frame: pd.DataFrame, new_root: str | Path, data_format: str = AUTO) -> pd.DataFrame:
    """Point a split's keys at another copy of the data (``evaluate --data``), whatever its source."""
    kind = detect_format(new_root, data_format)
    return get_source(kind).rebase(frame, Path(new_root).expanduser().resolve())
