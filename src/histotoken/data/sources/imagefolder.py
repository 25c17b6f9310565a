"""ImageFolder trees as a data source: ``ROOT/<class>/**/<image>``, one folder per class.

Classes are the names of the folders that hold images, sorted. ``patient_id`` comes from a groups
CSV (``image,group``; ``ROOT/groups.csv`` by default, or ``--groups``) when there is one, else it is
the image's own relative path (every image its own group, with a warning that patients may leak).
Any tree of class folders satisfies this source, so detection asks it last (see
:func:`histotoken.data.sources.detect_format`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from histotoken.data.decode import IMAGE_SUFFIXES, decode_image, size_or_skip
from histotoken.data.sources import INDEX_COLUMNS, NO_MAGNIFICATION, DataSource, IndexResult, SourceWords
from histotoken.formats import GROUP_COLUMNS, GROUPS_FILE

if TYPE_CHECKING:
    import pandas as pd
    import torch

logger = logging.getLogger(__name__)


def class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files_in(folder: Path) -> list[Path]:
    """Image files below ``folder``, sorted; hidden folders (``.ipynb_checkpoints``, ...) are not searched."""
    found = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(Path(here) / name for name in files if name.lower().endswith(IMAGE_SUFFIXES))
    return sorted(found)


def _holds_an_image(folder: Path) -> bool:
    for _here, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(name.lower().endswith(IMAGE_SUFFIXES) for name in files):
            return True
    return False


def read_groups(path: str | Path) -> dict[str, str]:
    """``image,group`` CSV -> {image: group}; image is a path relative to the root or a file name."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"groups file {path} does not exist; give a CSV with columns image,group")
    table = pd.read_csv(path, dtype=str)
    missing = [c for c in GROUP_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"groups file {path} lacks columns {missing}; write a CSV with a header 'image,group'")
    return dict(zip(table["image"].str.strip(), table["group"].str.strip()))


def groups_file(root: Path, groups: str | Path | None) -> Path | None:
    """The groups CSV in use: ``groups`` when given, else ``ROOT/groups.csv`` when present."""
    if groups:
        return Path(groups).expanduser().resolve()
    default = root / GROUPS_FILE
    return default if default.is_file() else None


class ImageFolderSource:
    name = "imagefolder"
    words = SourceWords(
        group="group", groups="groups", class_word="class", classes_word="classes",
        has_magnification=False, description="an ImageFolder tree (one folder per class)",
    )
    decodes_images = True
    key_suffix = ""

    def detect(self, root: Path) -> bool:
        """At least one non-hidden sub-folder holds an image file."""
        return any(_holds_an_image(folder) for folder in class_folders(root))

    def class_names(self, root: Path) -> tuple[str, ...]:
        """Sorted names of the class folders that hold images; ValueError for fewer than two."""
        names = tuple(folder.name for folder in class_folders(root) if _holds_an_image(folder))
        if not names:
            raise ValueError(f"no images in class folders below {root}; expected ROOT/<class>/<image>.png")
        if len(names) == 1:
            raise ValueError(
                f"{root} has only one class folder ({names[0]}); a classifier needs at least two. "
                "Add a folder of images for each other class"
            )
        return names

    def scan(self, root: Path, groups: str | Path | None = None, check_images: bool = True) -> IndexResult:
        """One row per image, decode-checked; the class count is checked before anything is decoded."""
        import pandas as pd

        names = self.class_names(root)
        groups_path = groups_file(root, groups)
        group_of = read_groups(groups_path) if groups_path else {}
        rows, skipped, ungrouped = [], [], []
        for name in names:
            for path in image_files_in(root / name):
                relative = path.relative_to(root).as_posix()
                size = size_or_skip(path, check_images, skipped)
                if size is None:
                    continue
                width, height = size
                group = group_of.get(relative, group_of.get(path.name))
                if group_of and group is None:
                    ungrouped.append(relative)
                rows.append({
                    "path": str(path), "patient_id": group if group is not None else relative,
                    "tumor_class": name, "label": name, "magnification": NO_MAGNIFICATION,
                    "width": width, "height": height,
                })
        if not rows:
            raise ValueError(f"no readable images in class folders below {root}; expected ROOT/<class>/<image>.png")
        if ungrouped:
            raise ValueError(
                f"groups file {groups_path} names no group for {len(ungrouped)} images (e.g. {ungrouped[0]}); "
                "add a row 'image,group' for each image (relative path or file name)"
            )
        for path, reason in skipped:
            logger.warning("left out %s: %s", path, reason)
        kept = tuple(sorted({row["label"] for row in rows}))
        if len(kept) == 1:
            raise ValueError(
                f"{root} has only one class folder ({kept[0]}) with readable images; a classifier needs at least "
                "two. See the warnings above for the files left out"
            )
        frame = pd.DataFrame(rows, columns=INDEX_COLUMNS)
        return IndexResult(frame, skipped, self.name, kept, bool(group_of))

    def read(self, key: str) -> torch.Tensor:
        return decode_image(key)

    def classes(
        self, task: str, root: Path | None = None, frame: pd.DataFrame | None = None
    ) -> tuple[tuple[str, ...], str]:
        """The data's own classes in ``label`` whatever the task: the frame's labels, else the folder names."""
        if frame is not None:
            return tuple(sorted(frame["label"].astype(str).unique())), "label"
        if root is None:
            raise ValueError("ImageFolder classes need the data folder or its index frame")
        return self.class_names(root), "label"

    def rebase(self, frame: pd.DataFrame, new_root: Path) -> pd.DataFrame:
        """Paths relative to the old root (the folder common to every path) put below ``new_root``."""
        paths = frame["path"].astype(str)
        old_root = Path(os.path.commonpath(list(paths)))
        if frame["label"].nunique() < 2:  # one class: the common folder is the class folder itself
            old_root = old_root.parent if old_root.name == str(frame["label"].iloc[0]) else old_root
        frame = frame.copy()
        frame["path"] = [str(new_root / Path(path).relative_to(old_root)) for path in paths]
        return frame


SOURCE: DataSource = ImageFolderSource()
