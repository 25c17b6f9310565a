"""Model families registered into timm on import, plus the model factory.

After ``import histotoken`` every family here is available as ``timm.create_model(name)``.
"""

from histotoken.models import cnnprune_vit, small_baselines, tokenlearner_vit, tokenmixer  # noqa: F401
from histotoken.models.factory import ModelSpec, create_model, load_weights, parse_model_spec
from histotoken.models.records import TokenRecord, record_tokens
from histotoken.models.token_merging import apply_token_merging

__all__ = [
    "ModelSpec", "TokenRecord", "apply_token_merging", "create_model", "load_weights", "parse_model_spec", "record_tokens",
]
