"""Print where every parameter and main activation of a model lives on a mesh.

Each parameter's ``logical_axes`` metadata goes through the logical axis rules of
:mod:`modjax.sharding` to a ``PartitionSpec``; the table shows it with the per-device
shard shape and bytes, so a wrong rule or an unshardable size shows up before a run.

Example::

    model = MyModel(config, rngs=nnx.Rngs(0))
    print_layout(model, make_mesh(data=2, expert=4))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from modjax.sharding import DEFAULT_RULES, logical_to_spec

#: Main activations of a transformer with MoE layers: name (with shape letters) ->
#: logical axes. Tokens are flattened to T = B * L inside MoE layers.
DEFAULT_ACTIVATIONS: dict[str, tuple[str | None, ...]] = {
    "hidden [B, L, D]": ("batch", "length", "embed"),
    "attention heads [B, L, H, Dh]": ("batch", "length", "heads", "head_dim"),
    "mlp hidden [B, L, F]": ("batch", "length", "mlp"),
    "logits [B, L, V]": ("batch", "length", "vocab"),
    "moe tokens [T, D]": ("batch", "embed"),
    "router probs [T, E]": ("batch", None),
    "expert weights [E, D, F]": ("expert", "embed", "expert_mlp"),
}


def _spec_str(spec: jax.P) -> str:
    parts = []
    for entry in spec:
        if entry is None:
            parts.append("-")
        elif isinstance(entry, str):
            parts.append(entry)
        else:
            parts.append("(" + ",".join(entry) + ")")
    return "P(" + ", ".join(parts) + ")" if parts else "P()"


def _shard_shape(shape: Sequence[int], spec: jax.P, mesh) -> str:
    dims = []
    for i, size in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        ways = math.prod(mesh.shape[a] for a in axes)
        # A size the mesh does not divide is padded by XLA: flag it with "!".
        dims.append(f"{-(-size // ways)}{'!' if size % ways else ''}")
    return "[" + ", ".join(dims) + "]"


def _itemsize(dtype) -> int:
    # jax's extended dtypes (PRNG keys of nnx.Rngs) are no numpy dtypes but know their size.
    return dtype.itemsize if hasattr(dtype, "itemsize") else np.dtype(dtype).itemsize


def _shard_bytes(shape, dtype, spec, mesh) -> int:
    n = 1
    for i, size in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        n *= -(-size // math.prod(mesh.shape[a] for a in axes))
    return n * _itemsize(dtype)


def _leaves(model_or_state):
    """(path, shape, dtype, logical axes or None, variable type name) of every leaf."""
    if isinstance(model_or_state, nnx.Module):
        model_or_state = nnx.state(model_or_state)
    if not isinstance(model_or_state, nnx.State):
        raise TypeError(
            f"model_or_state must be an nnx.Module or nnx.State, got "
            f"{type(model_or_state).__name__}"
        )
    rows = []
    for path, leaf in nnx.to_flat_state(model_or_state):
        if isinstance(leaf, nnx.Variable):
            value = leaf.get_value()
            axes = leaf.get_metadata().get("logical_axes")
            kind = type(leaf).__name__
        else:
            value, axes, kind = leaf, None, "-"
        rows.append(("/".join(str(p) for p in path), tuple(value.shape), value.dtype, axes, kind))
    return rows


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    lines = [fmt(header), fmt(["-" * w for w in widths])]
    return "\n".join(lines + [fmt(r) for r in rows])


def format_layout(
    model_or_state: nnx.Module | nnx.State,
    mesh: jax.sharding.Mesh,
    rules: Mapping[str, str | tuple[str, ...] | None] = DEFAULT_RULES,
    activations: Mapping[str, Sequence[str | None]] | None = None,
) -> str:
    """A table of every parameter's mesh layout, then the main activations' layouts.

    Args:
      model_or_state: an ``nnx.Module`` or the ``nnx.State`` of one (abstract states from
        ``nnx.eval_shape`` work too). Leaves without ``logical_axes`` are replicated.
      mesh: the mesh to lay out on (axes of size 1 are left out of the specs).
      rules: logical axis -> mesh axes (default :data:`modjax.sharding.DEFAULT_RULES`).
      activations: activation name -> logical axes (default :data:`DEFAULT_ACTIVATIONS`).

    Returns:
      A multi-line string: the mesh, a parameter table (path, variable type, shape, dtype,
      logical axes, PartitionSpec, per-device shard shape with ``!`` where the mesh does
      not divide the size, per-device bytes) and an activation table.
    """
    if not isinstance(mesh, jax.sharding.Mesh | jax.sharding.AbstractMesh):
        raise TypeError(f"mesh must be a jax Mesh, got {type(mesh).__name__}")
    activations = DEFAULT_ACTIVATIONS if activations is None else activations
    rows, total, per_device = [], 0, 0
    for path, shape, dtype, axes, kind in _leaves(model_or_state):
        if axes is not None and len(axes) != len(shape):
            raise ValueError(f"parameter {path!r} has shape {shape} but logical_axes {axes}")
        spec = logical_to_spec(axes, rules, mesh)
        nbytes = _shard_bytes(shape, dtype, spec, mesh)
        total += math.prod(shape) * _itemsize(dtype)
        per_device += nbytes
        rows.append(
            (
                path,
                kind,
                str(list(shape)),
                str(dtype),
                "-" if axes is None else "(" + ", ".join(str(a) for a in axes) + ")",
                _spec_str(spec),
                _shard_shape(shape, spec, mesh),
                f"{nbytes:,}",
            )
        )
    mesh_line = "mesh " + " x ".join(f"{a}={s}" for a, s in mesh.shape.items())
    params = _table(
        ("parameter", "type", "shape", "dtype", "logical axes", "spec", "per device", "bytes"),
        rows,
    )
    summary = (
        f"parameters: {len(rows)} arrays, {total:,} bytes in all, {per_device:,} bytes per device"
    )
    act_rows = [
        (
            name,
            "(" + ", ".join(str(a) for a in axes) + ")",
            _spec_str(logical_to_spec(axes, rules, mesh)),
        )
        for name, axes in activations.items()
    ]
    acts = _table(("activation", "logical axes", "spec"), act_rows)
    return "\n".join([mesh_line, "", params, summary, "", acts])


def print_layout(
    model_or_state: nnx.Module | nnx.State,
    mesh: jax.sharding.Mesh,
    rules: Mapping[str, str | tuple[str, ...] | None] = DEFAULT_RULES,
    activations: Mapping[str, Sequence[str | None]] | None = None,
) -> None:
    """Print :func:`format_layout`."""
    print(format_layout(model_or_state, mesh, rules, activations))
