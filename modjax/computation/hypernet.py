"""Hypernetworks: the parameters of a module generated from an embedding.

A small network maps a conditioning embedding ``z [Z]`` (a task embedding, possibly
combined with a layer embedding) to the flat parameter vector of a module -- a LoRA or a
bottleneck adapter -- which is then split and reshaped (HyperFormer, Karimi Mahabadi et
al. 2021, "Parameter-efficient Multi-task Fine-tuning for Transformers via Shared
Hypernetworks"; Üstün et al. 2022, "Hyper-X"). Parameters are shared across tasks and
layers; only the embeddings are task/layer specific.

Generator params: ``{"hidden": [Z, Hd], "hidden_bias": [Hd], "out": [Hd, M],
"out_bias": [M]}`` with ``M = param_count(spec)``; a spec is an ordered dict
``name -> shape``.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from modjax.typing import Array, PyTree, Shape

GENERATOR_KEYS = ("hidden", "hidden_bias", "out", "out_bias")


def lora_spec(d_in: int, d_out: int, rank: int) -> dict[str, Shape]:
    """The spec of a LoRA's factors: ``{"a": (d_in, R), "b": (R, d_out)}``."""
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    return {"a": (d_in, rank), "b": (rank, d_out)}


def adapter_spec(d_model: int, bottleneck_dim: int) -> dict[str, Shape]:
    """The spec of a bottleneck adapter (keys of :mod:`modjax.computation.adapter`)."""
    if not isinstance(bottleneck_dim, int) or bottleneck_dim <= 0:
        raise ValueError(f"bottleneck_dim must be a positive int, got {bottleneck_dim!r}")
    r = bottleneck_dim
    return {"down": (d_model, r), "down_bias": (r,), "up": (r, d_model), "up_bias": (d_model,)}


def param_count(spec: Mapping[str, Shape]) -> int:
    """Total number of generated parameters ``M`` of a spec."""
    return int(sum(int(np.prod(s)) for s in spec.values()))


def unflatten_params(flat: Array, spec: Mapping[str, Shape]) -> dict[str, Array]:
    """Split ``flat [..., M]`` into ``{name: [..., *shape]}`` in spec order."""
    m = param_count(spec)
    if flat.shape[-1] != m:
        raise ValueError(f"flat params have {flat.shape[-1]} entries, spec needs {m}: {spec}")
    out, start = {}, 0
    batch = flat.shape[:-1]
    for name, shape in spec.items():
        n = int(np.prod(shape))
        out[name] = flat[..., start : start + n].reshape(*batch, *shape)
        start += n
    return out


def generate_params(
    z: Array, generator: PyTree, spec: Mapping[str, Shape], activation=jax.nn.relu
) -> dict[str, Array]:
    """Module parameters from a conditioning embedding.

    ``flat = act(z @ hidden + hidden_bias) @ out + out_bias``, split by ``spec``.

    Args:
      z: ``[..., Z]`` embeddings (e.g. ``[N, Z]`` for one module per task).
      generator: generator params (module docstring).
      spec: ``name -> shape`` of the generated module.
      activation: the hidden nonlinearity.

    Returns:
      ``{name: [..., *shape]}``.
    """
    if not isinstance(generator, dict) or set(generator) != set(GENERATOR_KEYS):
        got = sorted(generator) if isinstance(generator, dict) else type(generator).__name__
        raise ValueError(f"generator must have keys {sorted(GENERATOR_KEYS)}, got {got}")
    if z.shape[-1] != generator["hidden"].shape[0]:
        raise ValueError(
            f"z width {z.shape[-1]} does not match generator hidden {generator['hidden'].shape}"
        )
    h = activation(z @ generator["hidden"] + generator["hidden_bias"])
    flat = h @ generator["out"] + generator["out_bias"]
    return unflatten_params(flat, spec)


def task_layer_embedding(task_embedding: Array, layer_embedding: Array) -> Array:
    """HyperFormer's conditioning input: ``concat(task, layer)`` broadcast together,
    ``[..., Zt] + [Zl] -> [..., Zt + Zl]``."""
    layer = jnp.broadcast_to(
        layer_embedding, (*task_embedding.shape[:-1], layer_embedding.shape[-1])
    )
    return jnp.concatenate([task_embedding, layer.astype(task_embedding.dtype)], axis=-1)


__all__ = [
    "GENERATOR_KEYS",
    "adapter_spec",
    "generate_params",
    "lora_spec",
    "param_count",
    "task_layer_embedding",
    "unflatten_params",
]
