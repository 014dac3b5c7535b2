"""Decoder-only Transformer language model: RoPE, causal attention, pre-norm RMSNorm,
tied or untied embeddings, and dense / MoE / mixture-of-modules FFNs per block.

Example:
  >>> cfg = TransformerConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2,
  ...                         d_ff=64)
  >>> model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  >>> logits, aux = model(jnp.zeros((2, 8), jnp.int32))
  >>> logits.shape
  (2, 8, 64)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from modjax.models.blocks import (
    ATTENTION_IMPLS,
    Attention,
    FFNConfig,
    apply_blocks,
    build_blocks,
    check_positive,
    check_remat,
    normal_init,
    resolve_dtypes,
    rms_norm,
    token_embedding,
)
from modjax.sharding import shard_activation
from modjax.typing import Array


@dataclasses.dataclass(frozen=True)
class TransformerConfig(FFNConfig):
    """Hyper-parameters of :class:`TransformerLM`.

    Attributes:
      vocab_size, d_model, num_layers, num_heads: sizes; head_dim defaults to
        ``d_model // num_heads``.
      d_ff, activation: the dense FFN (and default expert) width and activation.
      ffn: ``"dense"``, ``"moe"`` or ``"mixture"``: the kind of the sparse blocks.
      sparse_placement, sparse_every, sparse_count: which blocks are sparse
        (see :func:`modjax.models.blocks.sparse_layer_indices`).
      sparse_kwargs: keyword arguments of the sparse layer (e.g. ``num_experts``, ``k``).
      tie_embeddings: logits through the transposed input embedding.
      rope_base: RoPE frequency base; attention_impl: ``"auto"`` (cuDNN flash attention
        on GPU where it applies, else XLA), ``"xla"``, ``"cudnn"`` or ``None`` (jax's
        choice); see ``modjax.models.blocks.attention``.
      dtype, param_dtype: compute and parameter dtypes.
    """

    vocab_size: int
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    head_dim: int | None = None
    d_ff: int = 512
    activation: str = "swiglu"
    ffn: str = "dense"
    sparse_placement: str = "every"
    sparse_every: int = 2
    sparse_count: int = 1
    sparse_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    tie_embeddings: bool = True
    rope_base: float = 10_000.0
    attention_impl: str | None = "auto"
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        check_remat(self.remat)
        check_positive(
            vocab_size=self.vocab_size, d_model=self.d_model, num_layers=self.num_layers,
            num_heads=self.num_heads, d_ff=self.d_ff,
        )  # fmt: skip
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                "set head_dim"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}"
            )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads


class TransformerLM(nnx.Module):
    """``tokens [B, T] int -> (logits [B, T, V] float32, aux)``.

    ``aux = {"aux_losses": {name: scalar summed over blocks}, "metrics": {name: mean over
    sparse blocks}, "expert_load": [L_moe, E]}`` (the last only with MoE blocks).
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, param_dtype = resolve_dtypes(config.dtype, config.param_dtype)
        self.dtype = dtype
        dtypes = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed = token_embedding(config.vocab_size, config.d_model, **dtypes)

        def attention():
            return Attention(
                config.d_model, config.num_heads, config.resolved_head_dim, causal=True,
                use_rope=True, rope_base=config.rope_base,
                implementation=config.attention_impl, **dtypes,
            )  # fmt: skip

        self.blocks = build_blocks(
            config.d_model, config.ffn_spec(), config.num_layers, attention_fn=attention,
            **dtypes,
        )  # fmt: skip
        self.final_norm = rms_norm(config.d_model, param_dtype, rngs)
        self.head = (
            None
            if config.tie_embeddings
            else nnx.Linear(
                config.d_model,
                config.vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=normal_init(config.d_model**-0.5),
                kernel_metadata={"logical_axes": ("embed", "vocab")},
                rngs=rngs,
            )  # fmt: skip
        )

    def __call__(
        self, tokens: Array, *, train: bool = False, **ffn_context
    ) -> tuple[Array, dict[str, Any]]:
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"tokens must be an int array [B, T], got {tokens.dtype}{list(tokens.shape)}"
            )
        x = self.embed(tokens).astype(self.dtype)
        x = shard_activation(x, ("batch", "length", "embed"))
        x, aux = apply_blocks(self.blocks, x, train=train, remat=self.config.remat, **ffn_context)
        x = self.final_norm(x)
        if self.head is None:  # scale the [B, T, D] input, not the [B, T, V] logits: a V-wide
            # elementwise pass fewer, forward and backward
            logits = self.embed.attend((x * self.config.d_model**-0.5).astype(self.dtype))
        else:
            logits = self.head(x.astype(self.dtype))
        logits = shard_activation(logits.astype(jnp.float32), ("batch", "length", "vocab"))
        return logits, aux


__all__ = ["TransformerConfig", "TransformerLM"]
