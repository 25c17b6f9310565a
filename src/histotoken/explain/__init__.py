"""Explanations: attribution maps, t-SNE and faithfulness curves of a trained run -> files.

One method per module: :mod:`~histotoken.explain.rollout` (attention rollout for ViTs),
:mod:`~histotoken.explain.token_maps` (TokenLearner maps, CNN-pruning scores and kept patches),
:mod:`~histotoken.explain.tome_sources` (which patches merged tokens hold),
:mod:`~histotoken.explain.gradcam` (Grad-CAM via ``pytorch_grad_cam``),
:mod:`~histotoken.explain.tsne`, :mod:`~histotoken.explain.faithfulness` (deletion/insertion curves),
:mod:`~histotoken.explain.figures`; :func:`~histotoken.explain.run.explain_run` ties them together.
"""
