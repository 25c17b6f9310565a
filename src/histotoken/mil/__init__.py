"""Slide classifiers on tile tokens: aggregators over per-slide feature bags, their data, fit and cost.

See docs/mil.md. Modules: ``aggregators`` (one nn.Module per aggregator, ``create_aggregator``),
``data`` (bags from per-slide HDF5 files), ``train`` (fit, predict, slide metrics, run folders),
``cost`` (tokens, milliseconds and peak memory per slide).
"""
