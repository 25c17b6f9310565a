"""Render a report's sections twice: one self-contained HTML page and Markdown beside PNG files.

The HTML has its CSS and PNG figures inline (no scripts, no external links); the Markdown refers
to the figures in ``figures/``.
"""

from __future__ import annotations

import base64
import html
import re
from typing import Any

import pandas as pd

from histotoken.formats import FIGURES_DIR
from histotoken.reporting.blocks import (
    Details,
    FigureBlock,
    Heading,
    Note,
    Paragraph,
    Preformatted,
    Section,
    Table,
)
from histotoken.reporting.formatting import MISSING

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1180px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
h3 { margin-top: 1.4em; } h4 { margin-bottom: .3em; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: .86em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f2f4f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: bottom; text-align: left; font-size: .85em; color: #555; padding-top: .3em; }
figure { margin: 1em 0 1.6em; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #333; } .how { color: #555; font-size: .88em; }
.banner { background: #fff3cd; border: 2px solid #e0a800; padding: .8em 1em; font-weight: 600; }
.note { background: #f4f6f8; border-left: 4px solid #8a9bb0; padding: .4em .8em; margin: .6em 0; }
details { margin: .5em 0; border: 1px solid #e3e3e3; padding: .3em .8em; }
summary { cursor: pointer; font-weight: 600; } pre { background: #f7f7f7; padding: .8em; overflow-x: auto; }
nav ol { columns: 2; }
"""

_NUMERIC_CELL = re.compile(r"^[+\-]?(\d[\d,]*(\.\d+)?)( \[.*\])?$|^" + MISSING + "$")


def render_html(title: str, sections: list[Section], banner: str | None) -> str:
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if banner:
        parts.append(f'<p class="banner">{_text_html(banner)}</p>')
    parts.append("<nav><ol>" + "".join(
        f'<li><a href="#{section.key}">{html.escape(section.title)}</a></li>' for section in sections
    ) + "</ol></nav>")
    for section in sections:
        parts.append(f'<section id="{section.key}"><h2>{html.escape(section.title)}</h2>')
        parts += [_block_html(block) for block in section.blocks]
        parts.append("</section>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _text_html(text: str) -> str:
    """Escape text for HTML and show `command` spans as code, as Markdown would."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _block_html(block) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{_text_html(block.text)}</p>"
    if isinstance(block, Note):
        return f'<p class="note">Note: {_text_html(block.text)}</p>'
    if isinstance(block, Heading):
        return f"<h{block.level}>{html.escape(block.text)}</h{block.level}>"
    if isinstance(block, Preformatted):
        return f"<pre>{html.escape(block.text)}</pre>"
    if isinstance(block, Table):
        return _table_html(block)
    if isinstance(block, FigureBlock):
        data = base64.b64encode(block.png).decode("ascii")
        return (
            f'<figure><img alt="{html.escape(block.caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_text_html(block.caption)}<br>"
            f'<span class="how">How to read this: {_text_html(block.how_to_read)}</span></figcaption></figure>'
        )
    if isinstance(block, Details):
        inner = "\n".join(_block_html(child) for child in block.blocks)
        opened = " open" if block.open else ""
        return f"<details{opened}><summary>{html.escape(block.summary)}</summary>\n{inner}\n</details>"
    raise TypeError(f"unknown report block {type(block).__name__}")


def _table_html(block: Table) -> str:
    frame = block.frame
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for values in frame.itertuples(index=False):
        cells = []
        for value in values:
            text = str(value)
            numeric = ' class="num"' if _NUMERIC_CELL.match(text) else ""
            cells.append(f"<td{numeric}>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    caption = f"<caption>{_text_html(block.caption)}</caption>" if block.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def markdown_table(frame: pd.DataFrame) -> str:
    """A frame of text cells as a GitHub-flavoured Markdown table (no extra dependency)."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |",
             "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def render_markdown(title: str, sections: list[Section], banner: str | None) -> str:
    parts = [f"# {title}", ""]
    if banner:
        parts += [f"> **{banner}**", ""]
    for section in sections:
        parts += [f"## {section.title}", ""]
        parts += [_block_markdown(block) for block in section.blocks]
    return "\n".join(parts).rstrip() + "\n"


def _block_markdown(block, details_level: int = 3) -> str:
    if isinstance(block, Paragraph):
        return block.text + "\n"
    if isinstance(block, Note):
        return f"> Note: {block.text}\n"
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}\n"
    if isinstance(block, Preformatted):
        return f"```yaml\n{block.text.rstrip()}\n```\n"
    if isinstance(block, Table):
        caption = f"\n*{block.caption}*\n" if block.caption else ""
        return markdown_table(block.frame) + "\n" + caption
    if isinstance(block, FigureBlock):
        return f"![{block.caption}]({FIGURES_DIR}/{block.name})\n\n*How to read this:* {block.how_to_read}\n"
    if isinstance(block, Details):
        inner = "\n".join(_block_markdown(child) for child in block.blocks)
        return f"{'#' * details_level} {block.summary}\n\n{inner}"
    raise TypeError(f"unknown report block {type(block).__name__}")


def collect_figures(sections: list[Section]) -> list[FigureBlock]:
    found = []

    def visit(blocks: list) -> None:
        for block in blocks:
            if isinstance(block, FigureBlock):
                found.append(block)
            elif isinstance(block, Details):
                visit(block.blocks)

    for section in sections:
        visit(section.blocks)
    return found

