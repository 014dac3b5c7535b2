"""Prompt and prefix tuning layers (Lester et al. 2021; Li & Liang 2021).

* :class:`PromptTuning`: ``P`` learned embeddings prepended to ``x [B, T, D]``;
  ``extend_mask`` widens a ``[B, T]`` mask to ``[B, P + T]``.
* :class:`PromptedEmbed`: wraps an embedding module so that ``embed(tokens)`` comes out
  with the prompt in front (what :func:`modjax.surgery.add_prompt` inserts).
* :class:`PrefixTuning`: ``P`` learned keys and values per attention layer; call it with
  the layer's keys and values to get them with the prefix prepended.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from modjax.computation import prompt as prompt_lib
from modjax.layers.params import PromptParam
from modjax.typing import Array, DType


def _check_positive(**kwargs) -> None:
    for name, v in kwargs.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


class PromptTuning(nnx.Module):
    """``[B, T, D] -> [B, P + T, D]``: prepend a learned prompt ``[P, D]``.

    Args:
      prompt_length: P.
      d_model: D.
      init_std: std of the prompt's normal init (Lester et al. also init from vocab
        embeddings: assign ``self.prompt[...]`` to do so).
    """

    def __init__(
        self,
        prompt_length: int,
        d_model: int,
        *,
        init_std: float = 0.02,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_positive(prompt_length=prompt_length, d_model=d_model)
        self.prompt_length, self.d_model = prompt_length, d_model
        p = init_std * nnx.initializers.normal(1.0)(
            rngs.params(), (prompt_length, d_model), param_dtype
        )
        self.prompt = PromptParam(p, logical_axes=("prompt", "embed"))

    def __call__(self, x: Array) -> Array:
        return prompt_lib.prepend_prompt(x, self.prompt[...])[0]

    def extend_mask(self, mask: Array) -> Array:
        """``[B, T] -> [B, P + T]`` with the prompt positions visible."""
        return prompt_lib.extend_mask(mask, self.prompt_length)


class PromptedEmbed(nnx.Module):
    """``prompt(base(tokens, ...))``: an embedding whose output starts with the prompt."""

    def __init__(self, base: nnx.Module, prompt: PromptTuning):
        self.base, self.prompt = base, prompt

    def __call__(self, tokens: Array, *args, **kwargs) -> Array:
        return self.prompt(self.base(tokens, *args, **kwargs))

    def attend(self, query: Array) -> Array:
        """The base embedding's ``attend`` (tied output heads), prompt not involved."""
        return self.base.attend(query)


class PrefixTuning(nnx.Module):
    """Learned prefix keys and values ``[P, H, Dh]`` for one attention layer.

    ``__call__(keys, values, mask=None)`` returns a
    :class:`~modjax.computation.prompt.PrefixKV` with ``[B, P + T, H, Dh]`` keys/values
    and the ``[B, P + T]`` mask (None if ``mask`` is None).
    """

    def __init__(
        self,
        prefix_length: int,
        num_heads: int,
        head_dim: int,
        *,
        init_std: float = 0.02,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_positive(prefix_length=prefix_length, num_heads=num_heads, head_dim=head_dim)
        self.prefix_length = prefix_length
        shape = (prefix_length, num_heads, head_dim)
        init = nnx.initializers.normal(init_std)
        axes = ("prompt", "heads", "head_dim")
        self.prefix_keys = PromptParam(init(rngs.params(), shape, param_dtype), logical_axes=axes)
        self.prefix_values = PromptParam(init(rngs.params(), shape, param_dtype), logical_axes=axes)

    def __call__(
        self, keys: Array, values: Array, mask: Array | None = None
    ) -> prompt_lib.PrefixKV:
        return prompt_lib.prepend_prefix(
            keys, values, self.prefix_keys[...], self.prefix_values[...], mask
        )


__all__ = ["PrefixTuning", "PromptTuning", "PromptedEmbed"]
