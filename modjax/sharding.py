"""Device meshes, logical axis rules, and the one activation-sharding helper.

Parameters carry *logical* axis names as Variable metadata (``logical_axes=(...)``,
e.g. ``nnx.Param(w, logical_axes=("embed", "mlp"))``); the rules below map those names
to *mesh* axes. Layers never name mesh axes: changing the mesh or the rules re-shards the
model without touching model code.

Mesh axes (always all four, size 1 where unused):
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters sharded over it (ZeRO-3 style)
  expert  expert parallelism: experts split across devices; tokens also split over it
  tensor  tensor (model) parallelism of hidden and head dimensions
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from modjax.typing import Array

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "expert", "tensor")

#: Logical axis name -> mesh axis (or tuple of mesh axes, or None for replicated).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),
    "length": None,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "head_dim": None,
    "kv": None,
    "vocab": "tensor",
    "expert": "expert",
    "expert_mlp": "tensor",
    "rank": None,
    "prompt": None,
    "task": None,
    "norm": None,
}


def make_mesh(
    data: int = -1, fsdp: int = 1, expert: int = 1, tensor: int = 1, devices=None
) -> jax.sharding.Mesh:
    """A mesh with axes ``MESH_AXES``; one size may be -1 (all remaining devices).

    Args:
      data, fsdp, expert, tensor: axis sizes; their product must equal the device count.
      devices: the devices to use (default: all of ``jax.devices()``).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, int) or size == 0 or size < -1:
            raise ValueError(f"mesh axis {name!r} must be a positive int or -1, got {size!r}")
    unknown = [n for n, s in sizes.items() if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {unknown}")
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if unknown:
        if len(devices) % known:
            raise ValueError(
                f"cannot fill mesh axis {unknown[0]!r}: {len(devices)} devices are not "
                f"divisible by the other axes' product {known}"
            )
        sizes[unknown[0]] = len(devices) // known
    total = int(np.prod(list(sizes.values())))
    if total != len(devices):
        raise ValueError(f"mesh {sizes} needs {total} devices, but {len(devices)} are given")
    shape = tuple(sizes[a] for a in MESH_AXES)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def logical_to_spec(
    logical_axes: Sequence[str | None] | None,
    rules: Mapping[str, str | tuple[str, ...] | None] = DEFAULT_RULES,
    mesh: jax.sharding.Mesh | None = None,
) -> PartitionSpec:
    """The PartitionSpec of an array whose axes have these logical names.

    A mesh axis is used at most once per array (later uses become replicated), and when
    ``mesh`` is given, mesh axes of size 1 are dropped.
    """
    if logical_axes is None:
        return PartitionSpec()
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        if name is not None and name not in rules:
            raise ValueError(f"unknown logical axis {name!r}; known: {sorted(rules)}")
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(
            a for a in axes if a not in used and (mesh is None or mesh.shape.get(a, 1) > 1)
        )
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def shard_activation(
    x: Array,
    logical_axes: Sequence[str | None],
    rules: Mapping[str, str | tuple[str, ...] | None] = DEFAULT_RULES,
) -> Array:
    """Constrain an activation's sharding by logical axis names (no-op without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or x.ndim != len(logical_axes):
        return x
    spec = logical_to_spec(logical_axes, rules, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _is_variable(x) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Variable)


def variable_tree(state, fn):
    """A nested pure dict (the layout of ``nnx.to_pure_dict(state)``) of
    ``fn(path, variable)`` for every Variable of an ``nnx.State``."""

    def walk(node, path):
        if _is_variable(node):
            return fn(path, node)
        return {k: walk(v, (*path, k)) for k, v in node.items()}

    return walk(state, ())


def state_shardings(
    state,
    mesh: jax.sharding.Mesh,
    rules: Mapping[str, str | tuple[str, ...] | None] = DEFAULT_RULES,
):
    """NamedShardings of an ``nnx.State``'s Variables from their ``logical_axes``
    metadata, as a pure dict (Variables without names, or whose sharded axes do not
    divide, are replicated on that axis)."""

    def sharding(path, v):
        axes = getattr(v, "logical_axes", None)
        shape = tuple(getattr(v.get_value(), "shape", ()))
        if axes is None or len(axes) != len(shape):
            return NamedSharding(mesh, PartitionSpec())
        spec = list(logical_to_spec(axes, rules, mesh))
        for i, entry in enumerate(spec):
            names = (entry,) if isinstance(entry, str) else tuple(entry or ())
            size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
            if shape[i] % size:
                spec[i] = None
        return NamedSharding(mesh, PartitionSpec(*spec))

    return variable_tree(state, sharding)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """The sharding of an input array ``[B, ...]``: batch over the data-parallel axes."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))
