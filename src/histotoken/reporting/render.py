"""Render a report's sections twice: one self-contained HTML page and Markdown beside PNG files.

The HTML has its CSS and figures inline (no scripts, no external links), or, for big studies, refers to
the figures in ``figures/`` beside it; the Markdown always refers to them there. Tables put their
caption above them, keep an interval on the line of its value, and fold rows after the first few.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

import pandas as pd

from histotoken.formats import FIGURES_DIR
from histotoken.reporting.blocks import (
    Bullets,
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

PAGE_COLUMN_PX = 1180  # the body's width at most: a figure wider than this is shown shrunk
CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: """ + str(PAGE_COLUMN_PX) + """px;
       margin: 1.2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.5em; margin: .3em 0; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
h3 { margin-top: 1.4em; } h4 { margin-bottom: .3em; }
.table-wrap { max-width: 100%; overflow-x: auto; }
table { border-collapse: collapse; margin: .3em 0 1em; font-size: .84em; }
th, td { border: 1px solid #ccc; padding: .2em .5em; text-align: left; vertical-align: top; }
th { background: #f2f4f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.ci { font-size: .82em; color: #555; white-space: nowrap; }
caption { caption-side: top; text-align: left; font-size: .95em; font-weight: 600; color: #222; padding-bottom: .3em; }
figure { margin: 1em 0 1.6em; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #333; } .how { color: #555; font-size: .88em; }
.banner { background: #fff3cd; border: 2px solid #e0a800; padding: .5em .9em; font-weight: 600; margin: .4em 0; }
.note { background: #f4f6f8; border-left: 4px solid #8a9bb0; padding: .4em .8em; margin: .6em 0; }
#summary ul { margin: .3em 0; padding-left: 1.3em; } #summary li { margin: .15em 0; }
#summary h2 { margin-top: .8em; }
details { margin: .5em 0; border: 1px solid #e3e3e3; padding: .3em .8em; }
summary { cursor: pointer; font-weight: 600; } pre { background: #f7f7f7; padding: .8em; overflow-x: auto; }
nav ol { columns: 3; font-size: .9em; } .size { color: #555; font-size: .85em; }
"""

# A table longer than this shows its first COLLAPSED_ROWS rows; the rest folds into <details>.
COLLAPSE_OVER = 14
COLLAPSED_ROWS = 8
_NUMERIC_CELL = re.compile(r"^[+\-]?(\d[\d,]*(\.\d+)?)( \[.*\])?$|^" + MISSING + "$")
_ESTIMATE_CELL = re.compile(r"^(\S+) (\[[^\]]+\])$")  # "0.81 [0.74, 0.88]": value, then its interval
SUMMARY_KEY = "summary"


def render_html(title: str, sections: list[Section], banner: str | None, external_figures: bool = False,
                size_note: str | None = None) -> str:
    """The page; a first section keyed ``summary`` comes right under the banner, above the contents.

    ``external_figures``: images refer to ``figures/<name>`` beside the page instead of being inlined.
    ``size_note``: a line under the title (e.g. the page's own size).
    """
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if banner:
        parts.append(f'<p class="banner">{_text_html(banner)}</p>')
    first = [section for section in sections[:1] if section.key == SUMMARY_KEY]
    rest = sections[len(first):]
    for section in first:
        parts.append(_section_html(section, external_figures))
    parts.append("<nav><ol>" + "".join(
        f'<li><a href="#{section.key}">{html.escape(section.title)}</a></li>' for section in sections
    ) + "</ol></nav>")
    if size_note:
        parts.append(f'<p class="size">{_text_html(size_note)}</p>')
    parts += [_section_html(section, external_figures) for section in rest]
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _section_html(section: Section, external_figures: bool) -> str:
    inner = "\n".join(_block_html(block, external_figures) for block in section.blocks)
    return f'<section id="{section.key}"><h2>{html.escape(section.title)}</h2>\n{inner}\n</section>'


def _text_html(text: str) -> str:
    """Escape text for HTML and show `command` spans as code, as Markdown would."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def figure_source(block: FigureBlock, external: bool) -> str:
    """The ``src`` of a figure: ``figures/<name>`` beside the page, or the image inline as a data URL."""
    if external:
        return f"{FIGURES_DIR}/{html.escape(block.name)}"
    return f"data:{block.mime};base64,{base64.b64encode(block.png).decode('ascii')}"


def _block_html(block, external_figures: bool = False) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{_text_html(block.text)}</p>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{_text_html(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Note):
        return f'<p class="note">Note: {_text_html(block.text)}</p>'
    if isinstance(block, Heading):
        return f"<h{block.level}>{html.escape(block.text)}</h{block.level}>"
    if isinstance(block, Preformatted):
        return f"<pre>{html.escape(block.text)}</pre>"
    if isinstance(block, Table):
        return _table_html(block)
    if isinstance(block, FigureBlock):
        return (
            f'<figure><img alt="{html.escape(block.caption)}" src="{figure_source(block, external_figures)}">'
            f"<figcaption>{_text_html(block.caption)}<br>"
            f'<span class="how">How to read this: {_text_html(block.how_to_read)}</span></figcaption></figure>'
        )
    if isinstance(block, Details):
        inner = "\n".join(_block_html(child, external_figures) for child in block.blocks)
        opened = " open" if block.open else ""
        return f"<details{opened}><summary>{html.escape(block.summary)}</summary>\n{inner}\n</details>"
    raise TypeError(f"unknown report block {type(block).__name__}")


def _cell_html(value: Any) -> str:
    """A cell; "0.81 [0.74, 0.88]" keeps its interval on one line, in smaller print."""
    text = str(value)
    numeric = ' class="num"' if _NUMERIC_CELL.match(text) else ""
    estimate = _ESTIMATE_CELL.match(text)
    if estimate:
        return f'<td{numeric}>{html.escape(estimate[1])} <span class="ci">{html.escape(estimate[2])}</span></td>'
    return f"<td{numeric}>{html.escape(text)}</td>"


def _table_html(block: Table) -> str:
    frame = block.frame
    head = "<thead><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns) + "</tr></thead>"
    rows = ["<tr>" + "".join(_cell_html(value) for value in values) + "</tr>"
            for values in frame.itertuples(index=False)]
    shown = block.collapse_after if block.collapse_after is not None else (
        COLLAPSED_ROWS if len(rows) > COLLAPSE_OVER else len(rows))
    caption = f"<caption>{_text_html(block.caption)}</caption>" if block.caption else ""
    table = f'<div class="table-wrap"><table>{caption}{head}<tbody>{"".join(rows[:shown])}</tbody></table></div>'
    if shown >= len(rows):
        return table
    rest = f'<div class="table-wrap"><table>{head}<tbody>{"".join(rows[shown:])}</tbody></table></div>'
    return (f"{table}<details><summary>The other {len(rows) - shown} of {len(rows)} rows</summary>"
            f"{rest}</details>")


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
    if isinstance(block, Bullets):
        return "".join(f"- {item}\n" for item in block.items)
    if isinstance(block, Note):
        return f"> Note: {block.text}\n"
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}\n"
    if isinstance(block, Preformatted):
        return f"```yaml\n{block.text.rstrip()}\n```\n"
    if isinstance(block, Table):
        caption = f"*{block.caption}*\n\n" if block.caption else ""
        return caption + markdown_table(block.frame) + "\n"
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


def write_report(folder: Path, title: str, sections: list[Section], banner: str | None) -> Path:
    """FOLDER/report.html (figures inlined), report.md and figures/*.png of ``sections``; the HTML's path."""
    from histotoken.formats import REPORT_HTML
    from histotoken.io import atomic_write_bytes, atomic_write_text

    for figure in collect_figures(sections):
        atomic_write_bytes(folder / FIGURES_DIR / figure.name, figure.png)
    path = folder / REPORT_HTML
    atomic_write_text(path.with_suffix(".md"), render_markdown(title, sections, banner))
    atomic_write_text(path, render_html(title, sections, banner))
    return path
