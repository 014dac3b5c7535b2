"""Residual MLP for small synthetic tasks: an input projection, pre-norm residual FFN
blocks (dense, MoE or mixture of modules) and a linear head.

Example:
  >>> model = MLP(MLPConfig(in_features=16, num_classes=4, d_model=32, d_ff=64),
  ...             rngs=nnx.Rngs(0))
  >>> logits, aux = model(jnp.zeros((8, 16)))
  >>> logits.shape
  (8, 4)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from modjax.models.blocks import (
    FFNConfig,
    apply_blocks,
    build_blocks,
    check_positive,
    check_remat,
    classifier_head,
    input_projection,
    resolve_dtypes,
    rms_norm,
    token_embedding,
)
from modjax.typing import Array


@dataclasses.dataclass(frozen=True)
class MLPConfig(FFNConfig):
    """Hyper-parameters of :class:`MLP`.

    Attributes:
      in_features: width of the (flattened) float input; or, with ``vocab_size > 0``,
        the number of int tokens per example, embedded and concatenated.
      num_classes: output width.
      per_token: inputs are ``[B, T, in_features]`` and every position is classified
        (logits ``[B, T, num_classes]``); otherwise inputs flatten to ``[B, -1]``.
      The remaining fields are as in :class:`~modjax.models.transformer.TransformerConfig`.
    """

    in_features: int
    num_classes: int
    vocab_size: int = 0
    per_token: bool = False
    d_model: int = 128
    num_layers: int = 2
    d_ff: int = 256
    activation: str = "gelu"
    ffn: str = "dense"
    sparse_placement: str = "all"
    sparse_every: int = 2
    sparse_count: int = 1
    sparse_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        check_remat(self.remat)
        check_positive(
            in_features=self.in_features, num_classes=self.num_classes,
            d_model=self.d_model, num_layers=self.num_layers, d_ff=self.d_ff,
        )  # fmt: skip
        if not isinstance(self.vocab_size, int) or self.vocab_size < 0:
            raise ValueError(f"vocab_size must be an int >= 0, got {self.vocab_size!r}")


class MLP(nnx.Module):
    """``x [B, ...] -> (logits [B, num_classes] float32, aux)``; aux as in
    :class:`~modjax.models.transformer.TransformerLM`."""

    def __init__(self, config: MLPConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, param_dtype = resolve_dtypes(config.dtype, config.param_dtype)
        self.dtype = dtype
        d = config.d_model
        dtypes = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed = token_embedding(config.vocab_size, d, **dtypes) if config.vocab_size else None
        in_width = config.in_features * (d if config.vocab_size else 1)
        self.input = input_projection(in_width, d, **dtypes)
        self.blocks = build_blocks(d, config.ffn_spec(), config.num_layers, **dtypes)
        self.final_norm = rms_norm(d, param_dtype, rngs)
        self.head = classifier_head(d, config.num_classes, **dtypes)

    def __call__(
        self, x: Array, *, train: bool = False, **ffn_context
    ) -> tuple[Array, dict[str, Any]]:
        lead = x.shape[:2] if self.config.per_token else x.shape[:1]
        if self.embed is not None:
            if not jnp.issubdtype(x.dtype, jnp.integer):
                raise ValueError(f"inputs must be int tokens when vocab_size > 0, got {x.dtype}")
            x = self.embed(x)
        x = x.reshape(*lead, -1).astype(self.dtype)
        if x.shape[-1] != self.input.in_features:
            raise ValueError(
                f"inputs flatten to width {x.shape[-1]}, expected {self.input.in_features}"
            )
        x, aux = apply_blocks(
            self.blocks, self.input(x), train=train, remat=self.config.remat, **ffn_context
        )
        logits = self.head(self.final_norm(x).astype(self.dtype)).astype(jnp.float32)
        return logits, aux


__all__ = ["MLP", "MLPConfig"]
