"""Bidirectional Transformer encoder for classification of token sequences or images
(ViT-like: non-overlapping patches, Dosovitskiy et al. 2021), with dense / MoE /
mixture-of-modules FFNs per block (V-MoE, Riquelme et al. 2021, when sparse).

Example:
  >>> cfg = EncoderConfig(num_classes=10, input_kind="patches", image_size=28,
  ...                     patch_size=7, channels=1, d_model=32, num_heads=2, d_ff=64)
  >>> logits, aux = EncoderClassifier(cfg, rngs=nnx.Rngs(0))(jnp.zeros((2, 28, 28, 1)))
  >>> logits.shape
  (2, 10)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from modjax.models.blocks import (
    Attention,
    FFNConfig,
    apply_blocks,
    build_blocks,
    check_positive,
    check_remat,
    classifier_head,
    input_projection,
    normal_init,
    resolve_dtypes,
    rms_norm,
    token_embedding,
)
from modjax.sharding import shard_activation
from modjax.typing import Array

INPUT_KINDS = ("tokens", "patches")
POOLINGS = ("mean", "cls")


@dataclasses.dataclass(frozen=True)
class EncoderConfig(FFNConfig):
    """Hyper-parameters of :class:`EncoderClassifier`.

    Attributes:
      num_classes: output classes.
      input_kind: ``"tokens"`` (int ``[B, T]``, needs ``vocab_size`` and ``max_len``) or
        ``"patches"`` (float images ``[B, H, W, C]`` or ``[B, H, W]``, needs
        ``image_size``, ``patch_size``, ``channels``).
      pooling: ``"mean"`` over positions or a learned ``"cls"`` token.
      The remaining fields are as in :class:`~modjax.models.transformer.TransformerConfig`.
    """

    num_classes: int
    input_kind: str = "tokens"
    vocab_size: int = 0
    max_len: int = 0
    image_size: int = 0
    patch_size: int = 0
    channels: int = 1
    pooling: str = "mean"
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 512
    activation: str = "gelu"
    ffn: str = "dense"
    sparse_placement: str = "every"
    sparse_every: int = 2
    sparse_count: int = 1
    sparse_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        check_remat(self.remat)
        check_positive(
            num_classes=self.num_classes, d_model=self.d_model, num_layers=self.num_layers,
            num_heads=self.num_heads, d_ff=self.d_ff,
        )  # fmt: skip
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {self.input_kind!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}"
            )
        if self.input_kind == "tokens":
            check_positive(vocab_size=self.vocab_size, max_len=self.max_len)
        else:
            check_positive(
                image_size=self.image_size, patch_size=self.patch_size, channels=self.channels
            )
            if self.image_size % self.patch_size:
                raise ValueError(
                    f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
                )

    @property
    def num_positions(self) -> int:
        if self.input_kind == "tokens":
            n = self.max_len
        else:
            n = (self.image_size // self.patch_size) ** 2
        return n + (self.pooling == "cls")


class EncoderClassifier(nnx.Module):
    """``inputs -> (logits [B, num_classes] float32, aux)``; aux as in
    :class:`~modjax.models.transformer.TransformerLM`."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, param_dtype = resolve_dtypes(config.dtype, config.param_dtype)
        self.dtype = dtype
        d = config.d_model
        dtypes = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if config.input_kind == "tokens":
            self.embed = token_embedding(config.vocab_size, d, **dtypes)
        else:
            self.embed = input_projection(config.patch_size**2 * config.channels, d, **dtypes)
        self.position = nnx.Param(
            normal_init(0.02)(rngs.params(), (config.num_positions, d), param_dtype),
            logical_axes=("length", "embed"),
        )
        self.cls = (
            nnx.Param(jnp.zeros((1, 1, d), param_dtype), logical_axes=(None, None, "embed"))
            if config.pooling == "cls"
            else None
        )

        def attention():
            return Attention(
                d, config.num_heads, d // config.num_heads, causal=False, use_rope=False,
                **dtypes,
            )  # fmt: skip

        self.blocks = build_blocks(
            d, config.ffn_spec(), config.num_layers, attention_fn=attention, **dtypes
        )
        self.final_norm = rms_norm(d, param_dtype, rngs)
        self.head = classifier_head(d, config.num_classes, **dtypes)

    def _patches(self, images: Array) -> Array:
        c = self.config
        if images.ndim == 3:
            images = images[..., None]
        if images.shape[1:] != (c.image_size, c.image_size, c.channels):
            raise ValueError(
                f"images must be [B, {c.image_size}, {c.image_size}, {c.channels}], "
                f"got {list(images.shape)}"
            )
        b, p, n = images.shape[0], c.patch_size, c.image_size // c.patch_size
        x = images.reshape(b, n, p, n, p, c.channels).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, n * n, p * p * c.channels).astype(self.dtype)

    def __call__(
        self, inputs: Array, *, train: bool = False, **ffn_context
    ) -> tuple[Array, dict[str, Any]]:
        c = self.config
        if c.input_kind == "tokens":
            if inputs.ndim != 2 or inputs.shape[1] > c.max_len:
                raise ValueError(f"tokens must be [B, T<={c.max_len}], got {list(inputs.shape)}")
            x = self.embed(inputs)
        else:
            x = self.embed(self._patches(inputs))
        if self.cls is not None:
            cls = jnp.broadcast_to(self.cls[...], (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls.astype(x.dtype), x], axis=1)
        x = x + self.position[...][: x.shape[1]].astype(x.dtype)
        x = shard_activation(x.astype(self.dtype), ("batch", "length", "embed"))
        x, aux = apply_blocks(self.blocks, x, train=train, remat=self.config.remat, **ffn_context)
        x = self.final_norm(x)
        pooled = x[:, 0] if self.cls is not None else x.mean(axis=1)
        logits = self.head(pooled.astype(self.dtype)).astype(jnp.float32)
        return logits, aux


__all__ = ["EncoderClassifier", "EncoderConfig"]
