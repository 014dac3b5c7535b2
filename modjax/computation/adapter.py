"""Bottleneck adapters: a down-projection, a nonlinearity and an up-projection.

``adapter(h) = act(h @ down + down_bias) @ up + up_bias`` with ``down [D, R]``,
``up [R, D]``. Placements (the survey's "function composition"):

* sequential, after a sublayer's output ``h``: ``h + adapter(h)`` (Houlsby et al. 2019,
  "Parameter-Efficient Transfer Learning for NLP", puts one after the attention and one
  after the FFN sublayer of every block; Pfeiffer et al. 2021, "AdapterFusion", only one,
  after the FFN) -- see ``PLACEMENTS``;
* parallel to a sublayer ``f`` reading its input ``x``: ``f(x) + s * adapter(x)`` (He et
  al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning").

Params are a dict ``{"down": [D, R], "down_bias": [R], "up": [R, D], "up_bias": [D]}``
(a parallel adapter beside a width-changing sublayer may have ``up [R, D_out]``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from modjax.typing import Array, PyTree

#: activation name -> function (computed in float32).
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}

#: placement name -> the sublayers of a transformer block that get a sequential adapter.
PLACEMENTS: dict[str, tuple[str, ...]] = {
    "houlsby": ("attention", "ffn"),
    "pfeiffer": ("ffn",),
}

ADAPTER_KEYS = ("down", "down_bias", "up", "up_bias")


def check_activation(activation: str):
    """The activation function of that name, or a ValueError listing the valid ones."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def check_adapter_params(params: PyTree) -> tuple[int, int, int]:
    """Validate adapter params; returns ``(D_in, R, D_out)`` (``D_out = D_in`` except for
    a parallel adapter beside a sublayer that changes the width)."""
    if not isinstance(params, dict) or set(params) != set(ADAPTER_KEYS):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"adapter params must have keys {sorted(ADAPTER_KEYS)}, got {got}")
    got = {k: tuple(v.shape) for k, v in params.items()}
    if len(got["down"]) != 2 or len(got["up"]) != 2:
        raise ValueError(f"adapter down and up must be matrices, got shapes {got}")
    (d, r), f = got["down"], got["up"][1]
    want = {"down": (d, r), "down_bias": (r,), "up": (r, f), "up_bias": (f,)}
    if got != want:
        raise ValueError(f"adapter params must have shapes {want}, got {got}")
    return d, r, f


def bottleneck(x: Array, params: PyTree, activation: str = "relu") -> Array:
    """The adapter branch ``act(x @ down + down_bias) @ up + up_bias``.

    Args:
      x: ``[..., D]``.
      params: adapter params (module docstring).
      activation: a key of ``ACTIVATIONS``.

    Returns:
      ``[..., D_out]`` in ``x``'s dtype.
    """
    act = check_activation(activation)
    d, _, _ = check_adapter_params(params)
    if x.shape[-1] != d:
        raise ValueError(f"x width {x.shape[-1]} does not match adapter width D={d}")
    h = x @ params["down"] + params["down_bias"]
    h = act(h.astype(jnp.float32)).astype(h.dtype)
    return (h @ params["up"] + params["up_bias"]).astype(x.dtype)


def sequential_adapter(
    h: Array, params: PyTree, activation: str = "relu", scale: float = 1.0
) -> Array:
    """``h + scale * bottleneck(h)``: an adapter after a sublayer output ``h [..., D]``
    (Houlsby / Pfeiffer placement)."""
    d, _, f = check_adapter_params(params)
    if d != f:
        raise ValueError(f"a sequential adapter must keep the width, got D_in={d}, D_out={f}")
    return h + scale * bottleneck(h, params, activation)


def parallel_adapter(
    x: Array, sublayer_out: Array, params: PyTree, activation: str = "relu", scale: float = 1.0
) -> Array:
    """``sublayer_out + scale * bottleneck(x)``: an adapter beside a sublayer, reading its
    input ``x [..., D_in]``, adding to its output ``[..., D_out]`` (He et al. 2022)."""
    _, _, f = check_adapter_params(params)
    if sublayer_out.shape[-1] != f:
        raise ValueError(
            f"sublayer_out width {sublayer_out.shape[-1]} must equal adapter D_out={f}"
        )
    return sublayer_out + scale * bottleneck(x, params, activation)


__all__ = [
    "ACTIVATIONS",
    "ADAPTER_KEYS",
    "PLACEMENTS",
    "bottleneck",
    "check_activation",
    "check_adapter_params",
    "parallel_adapter",
    "sequential_adapter",
]
