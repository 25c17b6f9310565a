"""What every section builder receives: the study's files, the page layout and figure naming."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from histotoken.reporting import plots
from histotoken.reporting.blocks import FigureBlock, Heading
from histotoken.reporting.formatting import file_name
from histotoken.reporting.study import StudyFiles

if TYPE_CHECKING:
    from histotoken.data.sources import SourceWords


@dataclasses.dataclass
class SectionContext:
    """Shared by the sections of one report; hands out unique figure file names across them."""

    study: StudyFiles
    _figure_names: set[str] = dataclasses.field(default_factory=set)
    _predictions: object = None

    def predictions(self):
        """The runs' per-image predictions (:class:`~histotoken.reporting.comparisons.StudyPredictions`),
        read once and shared by the summary and the statistics section, so that both quote the same
        paired intervals (same resamples, same seed)."""
        if self._predictions is None:
            from histotoken.reporting import comparisons
            from histotoken.reporting import statistics as st

            protocol = (self.study.spec or {}).get("protocol") or {}
            n_resamples = int(protocol.get("bootstrap") or st.DEFAULT_RESAMPLES) if isinstance(protocol, dict) \
                else st.DEFAULT_RESAMPLES
            self._predictions = comparisons.StudyPredictions(self.study, n_resamples=max(n_resamples, 200))
        return self._predictions

    @property
    def words(self) -> SourceWords:
        """The data's words for its groups and classes (``histotoken.data.sources.words``)."""
        return self.study.words

    @property
    def multiple_tasks(self) -> bool:
        return len(self.study.tasks) > 1

    @property
    def sub_level(self) -> int:
        """Sub-headings sit below a "Task: ..." heading only when the study has several tasks."""
        return 4 if self.multiple_tasks else 3

    def label(self, model: str, task: str) -> str:
        return f"{model} ({task})" if self.multiple_tasks else model

    def task_heading(self, task: str, blocks: list) -> None:
        if self.multiple_tasks:
            blocks.append(Heading(f"Task: {task}", level=3))

    def figure(self, name: str, figure, caption: str, how_to_read: str, photographic: bool = False) -> FigureBlock:
        """Render a matplotlib figure to a block named ``name`` (made unique within the report): a palette
        PNG for a plot, a JPEG for a grid of photographs (``photographic``)."""
        if photographic:
            return self._block(name, plots.figure_to_jpeg(figure), "jpg", caption, how_to_read)
        return self._block(name, plots.figure_to_png(figure), "png", caption, how_to_read)

    def png_figure(self, name: str, png: bytes, caption: str, how_to_read: str) -> FigureBlock:
        """A PNG another command wrote, re-encoded smaller where that costs nothing visible
        (:func:`histotoken.reporting.plots.compress_image`), as a block named ``name``."""
        data, extension = plots.compress_image(png)
        return self._block(name, data, extension, caption, how_to_read)

    def _block(self, name: str, data: bytes, extension: str, caption: str, how_to_read: str) -> FigureBlock:
        stem = file_name(name)
        # Two run ids may differ only in characters a file name cannot hold: keep both figures.
        unique, counter = stem, 1
        while unique in self._figure_names:
            counter += 1
            unique = f"{stem}_{counter}"
        self._figure_names.add(unique)
        return FigureBlock(f"{unique}.{extension}", data, caption, how_to_read)


@dataclasses.dataclass(frozen=True)
class ReportSection:
    """One section of the report: its anchor, its heading and the function that builds its blocks.

    ``needs_results``: the section compares results, so a study without result rows gets a note instead.
    ``applies``: whether the section belongs in this study's report at all (e.g. cross-magnification
    sections only for data with magnifications); None: always.
    """

    key: str
    title: str
    build: Callable[[SectionContext], list]
    needs_results: bool = False
    applies: Callable[[StudyFiles], bool] | None = None


def has_magnifications(study: StudyFiles) -> bool:
    """Whether the study's data have magnifications (BreakHis): the ``applies`` of cross-magnification sections."""
    return bool(study.words.has_magnification)
