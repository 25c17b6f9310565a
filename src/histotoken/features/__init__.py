"""Frozen features: embeddings from any timm backbone into HDF5 files, and probes trained on them.

- :mod:`~histotoken.features.store`: the file layout (one ``<slide>.h5`` per slide in the layout CLAM
  and TRIDENT read, or one ``features.h5`` for an image set, plus ``manifest.json``), written atomically.
- :mod:`~histotoken.features.embed`: the backbone (``timm.create_model(name, num_classes=0)``), its own
  preprocessing, batched extraction that resumes per slide, and the token-merging comparison.
- :mod:`~histotoken.features.probe`: linear / k-NN / MLP probes on cached features with the run's
  splits, written as an ordinary run folder.
"""
