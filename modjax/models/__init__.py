"""Model families: each a frozen Config dataclass and an NNX Model returning
``(logits, aux)``. :data:`MODELS` maps the config name of a family to both."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import nnx

from modjax.models.blocks import FFNSpec, collect_aux, sparse_layer_indices
from modjax.models.encoder import EncoderClassifier, EncoderConfig
from modjax.models.mlp import MLP, MLPConfig
from modjax.models.transformer import TransformerConfig, TransformerLM

MODELS: dict[str, tuple[type, type]] = {
    "transformer_lm": (TransformerConfig, TransformerLM),
    "encoder": (EncoderConfig, EncoderClassifier),
    "mlp": (MLPConfig, MLP),
}


def make_model(name: str, kwargs: Mapping[str, Any], *, rngs: nnx.Rngs) -> nnx.Module:
    """The model family ``name`` built from its Config's keyword arguments."""
    if name not in MODELS:
        raise ValueError(f"model name must be one of {sorted(MODELS)}, got {name!r}")
    config_cls, model_cls = MODELS[name]
    return model_cls(config_cls(**kwargs), rngs=rngs)


__all__ = [
    "MLP",
    "MODELS",
    "EncoderClassifier",
    "EncoderConfig",
    "FFNSpec",
    "MLPConfig",
    "TransformerConfig",
    "TransformerLM",
    "collect_aux",
    "make_model",
    "sparse_layer_indices",
]
