"""Domains: one magnification (``100``), a set (``100+400``, what studies call "mixed"), or ``all``."""

from __future__ import annotations

import pandas as pd

from histotoken.data.breakhis import MAGNIFICATIONS


def parse_domain(text: str | int) -> tuple[int, ...]:
    """``"100+400"`` -> ``(100, 400)``; ``"all"`` -> all four; ``"40X"`` is accepted for ``40``."""
    value = str(text).strip().lower()
    if value in ("all", "mixed-all"):
        return MAGNIFICATIONS
    parts = [part.strip().removesuffix("x") for part in value.split("+")]
    try:
        mags = sorted({int(part) for part in parts})
    except ValueError:
        raise ValueError(
            f"cannot read domain {text!r}; write a magnification (40, 100, 200, 400), "
            "a set joined by '+' (e.g. 100+400), or 'all'"
        ) from None
    unknown = [m for m in mags if m not in MAGNIFICATIONS]
    if unknown:
        raise ValueError(f"domain {text!r} names magnification {unknown[0]}; BreakHis has {MAGNIFICATIONS}")
    return tuple(mags)


def domain_name(text: str | int | tuple[int, ...]) -> str:
    """Canonical text of a domain: ``"400+100"`` -> ``"100+400"``; all four -> ``"all"``."""
    mags = tuple(text) if isinstance(text, tuple) else parse_domain(text)
    if tuple(sorted(mags)) == MAGNIFICATIONS:
        return "all"
    return "+".join(str(m) for m in sorted(mags))


def select_domain(frame: pd.DataFrame, domain: str, what: str = "the data") -> pd.DataFrame:
    """Rows of ``frame`` whose magnification is in ``domain``; a clear error when there are none.

    ``all`` selects every row, also of data without magnifications (ImageFolder, CIFAR-10, tiles:
    magnification 0); any other domain on such data is an error.
    """
    mags = parse_domain(domain)
    if frame.empty:  # before any talk of magnifications: an empty split has none, whatever the data
        raise ValueError(f"{what} is empty (no images); check the split (val_fraction, test_fraction, "
                         "or a data set too small to give every split a patient)")
    if mags == MAGNIFICATIONS:
        return frame
    if not frame["magnification"].isin(MAGNIFICATIONS).any():
        raise ValueError(
            f"domain {domain_name(domain)} names a magnification, but {what} has no magnifications "
            "(only BreakHis does); use the domain 'all' (train_domain: all, test_domains: [all])"
        )
    selected = frame[frame["magnification"].isin(mags)]
    if selected.empty:
        present = sorted(frame["magnification"].unique().tolist())
        raise ValueError(
            f"domain {domain_name(domain)} has no images in {what} (magnifications present: {present}); "
            "choose a domain that the data has"
        )
    return selected
