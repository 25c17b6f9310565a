"""``build_report``: a study folder's files -> ``report.html``, ``report.md`` and ``figures/``.

The report is rebuilt from the files alone (``docs/formats.md``, "Study folder"); nothing is
re-run and no model code is imported. Each section is a module of its own under
:mod:`histotoken.reporting.sections` that reads its own files and returns a list of blocks
(:mod:`histotoken.reporting.blocks`); this module builds them in order and renders the page twice
(:mod:`histotoken.reporting.render`): as one self-contained HTML file and as Markdown that refers to
the PNG files in ``figures/``. A missing or unreadable file turns into a note in its section; only a
folder without ``results.csv`` is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from histotoken.formats import FIGURES_DIR
from histotoken.io import atomic_write_bytes, atomic_write_text
from histotoken.reporting.blocks import Note, Section
from histotoken.reporting.render import collect_figures, render_html, render_markdown
from histotoken.reporting.sections import SECTIONS, ReportSection, SectionContext
from histotoken.reporting.study import StudyFiles, load_study
from histotoken.reporting.words import blocks_in_words, in_words

logger = logging.getLogger(__name__)

SYNTHETIC_BANNER = (
    "Synthetic data. Every number in this report comes from procedurally generated images "
    "(made by `histotoken synth`), not from real tissue. They show that the pipeline runs end to end "
    "and say nothing about how these models perform on real pathology."
)
NO_RESULTS = "results.csv has no result rows yet (no run has been evaluated): nothing to compare."


def build_sections(study: StudyFiles, sections: Sequence[ReportSection] = SECTIONS) -> list[Section]:
    """Build every section in order; a section that fails on a malformed file becomes a note."""
    context = SectionContext(study)
    built = []
    for section in sections:
        if section.applies is not None and not section.applies(study):
            continue
        if section.needs_results and study.summary.empty:
            built.append(Section(section.key, section.title, [Note(NO_RESULTS)]))
            continue
        try:
            blocks = section.build(context)
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            # A malformed file must not cost the user the rest of the report.
            logger.warning("report section %r could not be built: %s", section.title, error)
            logger.debug("details", exc_info=True)
            blocks = [Note(f"This section could not be built from the study files: {error}")]
        # sections are written in BreakHis's words; other data get their own (images, classes, ...)
        built.append(Section(section.key, in_words(section.title, study.words), blocks_in_words(blocks, study.words)))
    return built


FIGURES_MODES = ("inline", "external")


def build_report(study_dir: Path, out: Path | None = None, figures: str = "inline") -> Path:
    """Rebuild a study's report from its files; return the path of ``report.html``.

    Writes ``out`` (default ``STUDY_DIR/report.html``), ``report.md`` beside it (same stem) and
    the figures (palette PNG for plots, JPEG for photographs) in ``figures/`` beside it. With
    ``figures="inline"`` the HTML holds them too (one file that opens anywhere); with
    ``"external"`` it refers to ``figures/`` (for big studies). Raises ``FileNotFoundError`` when
    ``study_dir`` is not a study folder (no ``results.csv``).
    """
    if figures not in FIGURES_MODES:
        raise ValueError(f"figures={figures!r}: use one of {', '.join(FIGURES_MODES)}")
    study_dir = Path(study_dir)
    study = load_study(study_dir)
    out = Path(out) if out is not None else study.paths.report_html
    logger.info("building the report of %s", study_dir)
    sections = build_sections(study)
    banner = SYNTHETIC_BANNER if study.synthetic else None
    spec_name = (study.spec or {}).get("name") if isinstance(study.spec, dict) else None
    title = f"histotoken study report: {spec_name or study_dir.resolve().name}"

    collected = collect_figures(sections)
    for figure in collected:
        atomic_write_bytes(out.parent / FIGURES_DIR / figure.name, figure.png)
    atomic_write_text(out.with_suffix(".md"), render_markdown(title, sections, banner))
    external = figures == "external"
    figure_bytes = sum(len(figure.png) for figure in collected)
    page = render_html(title, sections, banner, external_figures=external, size_note=size_note(0, 0, external))
    page = render_html(title, sections, banner, external_figures=external,
                       size_note=size_note(len(page.encode("utf-8")), figure_bytes, external, len(collected)))
    atomic_write_text(out, page)
    logger.info("wrote %s (%s), %s and %d figures in %s", out, human_size(len(page.encode("utf-8"))),
                out.with_suffix(".md").name, len(collected), out.parent / FIGURES_DIR)
    return out


def human_size(n_bytes: float) -> str:
    """``1.2 MB``, ``340 kB`` (decimal units, as file browsers show them)."""
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}" if n_bytes < 10 * scale else f"{n_bytes / scale:.0f} {unit}"
    return f"{int(n_bytes)} bytes"


def describe_report(path: str | Path, external_figures: bool = False) -> str:
    """``PATH (7.1 MB; open it in a browser: one self-contained file)``, as the commands print it."""
    how = f"keep {FIGURES_DIR}/ beside it" if external_figures else "one self-contained file"
    return f"{path} ({human_size(Path(path).stat().st_size)}; open it in a browser: {how})"


def size_note(page_bytes: int, figure_bytes: int, external: bool, n_figures: int = 0) -> str:
    """The line that states the page's size (measured on a first rendering; the line itself adds a few bytes)."""
    if external:
        return (f"This page: {human_size(page_bytes)}; its {n_figures} figures ({human_size(figure_bytes)}) are "
                f"in {FIGURES_DIR}/ beside it (`histotoken report --figures external`).")
    return (f"This page: {human_size(page_bytes)}, with its {n_figures} figures inline "
            "(`histotoken report --figures external` keeps them beside it instead).")
