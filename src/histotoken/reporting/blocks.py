"""The blocks a report page is made of: paragraphs, lists, notes, headings, tables, figures,
details.

A section builder (:mod:`histotoken.reporting.sections`) returns a list of these; the renderers in
:mod:`histotoken.reporting.render` turn the same list into HTML and into Markdown.
"""

from __future__ import annotations

import dataclasses

import pandas as pd


@dataclasses.dataclass
class Paragraph:
    text: str
    verbatim: bool = False  # quotes settings or data: kept as written, not put in the data's words


@dataclasses.dataclass
class Note:
    text: str


@dataclasses.dataclass
class Heading:
    text: str
    level: int = 3


@dataclasses.dataclass
class Bullets:
    items: list[str]


@dataclasses.dataclass
class Table:
    frame: pd.DataFrame  # cells already formatted as text
    caption: str = ""  # shown above the table: it names what the table compares
    collapse_after: int | None = None  # rows shown before the rest folds away (None: the renderer's default)


@dataclasses.dataclass
class FigureBlock:
    name: str  # file name under figures/; its extension (.png, .jpg) says the format of ``png``
    png: bytes  # the encoded image (PNG, or JPEG for photographic grids), as written to figures/
    caption: str
    how_to_read: str

    @property
    def mime(self) -> str:
        return "image/jpeg" if self.name.lower().endswith((".jpg", ".jpeg")) else "image/png"


@dataclasses.dataclass
class Preformatted:
    text: str


@dataclasses.dataclass
class Details:
    summary: str
    blocks: list
    open: bool = False


@dataclasses.dataclass
class Section:
    key: str
    title: str
    blocks: list

