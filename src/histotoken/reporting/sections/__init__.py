"""The report's sections, one module each, in the order the page shows them.

Each module defines ``SECTION``, a :class:`~histotoken.reporting.sections.context.ReportSection` whose
``build(context)`` reads the files it needs and returns the section's blocks. A new section is one more
module and one more entry in ``SECTIONS``.
"""

from histotoken.reporting.sections import (
    cost,
    cross_domain,
    explanations,
    failed,
    in_domain,
    preview,
    runs,
    seeds,
    setup,
    statistics,
    summary,
)
from histotoken.reporting.sections.context import ReportSection, SectionContext

SECTIONS: tuple[ReportSection, ...] = (
    summary.SECTION,  # first: the renderer puts it right under the banner, above the contents
    preview.SECTION,
    setup.SECTION,
    in_domain.SECTION,
    seeds.SECTION,  # mean ± SD where a cell has several seeds
    cross_domain.SECTION,
    statistics.SECTION,
    cost.SECTION,
    runs.SECTION,
    explanations.SECTION,
    failed.SECTION,
)

__all__ = ["SECTIONS", "ReportSection", "SectionContext"]
