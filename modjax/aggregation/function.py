"""Function aggregation: compose modules sequentially.

Stacking (function composition) applies modules one after another,
``f_n(... f_2(f_1(x)))``. MAD-X (Pfeiffer et al. 2020, "MAD-X: An Adapter-Based
Framework for Multi-Task Cross-Lingual Transfer") stacks a task adapter on top of a
language adapter in every layer, so that swapping the language adapter transfers the
task to a new language.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from modjax.typing import Array


def stack_apply(fns: Sequence[Callable[..., Array]], x: Array, *args: Any, **kwargs: Any) -> Array:
    """Apply ``fns`` in order: ``fns[-1](... fns[0](x, *args, **kwargs) ...)``.

    Extra arguments are passed to every function (e.g. a mask or ``train=...``).

    Args:
      fns: a non-empty sequence of callables ``x -> x`` (modules, pure functions).
      x: the input of the first function.

    Example:
      >>> stack_apply([language_adapter, task_adapter], h)  # MAD-X order
    """
    if isinstance(fns, dict) or not isinstance(fns, Sequence) or len(fns) == 0:
        raise ValueError(f"fns must be a non-empty sequence of callables, got {fns!r}")
    for i, f in enumerate(fns):
        if not callable(f):
            raise ValueError(f"fns[{i}] must be callable, got {type(f).__name__}")
    for f in fns:
        x = f(x, *args, **kwargs)
    return x


__all__ = ["stack_apply"]
