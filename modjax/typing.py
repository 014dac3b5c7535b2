"""Array aliases and the one shape glossary of modjax.

Docstrings and einsum strings across the package use these letters:

  B  batch                      T  tokens (or sequence length)
  D  model width                F  hidden (FFN) width
  E  experts or modules         K  experts selected per token
  C  capacity (slots per expert) G  groups of tokens routed together
  S  group size                 R  low rank
  P  prompt length              H  attention heads
  N  tasks

A shape written ``[T, E]`` means a rank-2 array with those axes, in that order.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import jax

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike
DType: TypeAlias = jax.typing.DTypeLike
PRNGKey: TypeAlias = jax.Array
PyTree: TypeAlias = Any
Shape: TypeAlias = tuple[int, ...]

__all__ = ["Array", "ArrayLike", "DType", "PRNGKey", "PyTree", "Shape"]
