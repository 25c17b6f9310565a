"""The blocks a report page is made of: paragraphs, notes, headings, tables, figures, details.

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
class Table:
    frame: pd.DataFrame  # cells already formatted as text
    caption: str = ""


@dataclasses.dataclass
class FigureBlock:
    name: str  # file name under figures/
    png: bytes
    caption: str
    how_to_read: str


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

