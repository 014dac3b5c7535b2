"""Feed-forward computations: a dense FFN, and FFN experts behind three dispatch strategies.

Parameters are plain dicts of arrays (``layers/`` owns and tags them):

* ``"swiglu"``: ``{"wi_gate": [D, F], "wi_up": [D, F], "wo": [F, D]}``,
  ``y = (silu(x wi_gate) * (x wi_up)) wo`` (Shazeer 2020, "GLU Variants Improve
  Transformer");
* ``"gelu"``: ``{"wi": [D, F], "wo": [F, D]}``, ``y = gelu(x wi) wo``.

Expert parameters are the same with a leading E axis (``wi_gate: [E, D, F]``, ...).

Mixture of FFN experts, ``y[t] = sum_k weight[t, k] * FFN_{expert_index[t, k]}(x[t])``,
from a :class:`~modjax.routing.types.Routing`, by one of ``STRATEGIES`` (equal whenever
nothing is dropped):

* ``"dropless"`` (default, MegaBlocks, Gale et al. 2023): sort the T*K assignments by
  expert into a block-padded buffer, run grouped matmuls
  (:mod:`modjax.kernels.grouped_matmul`; off the GPU, the whole expert FFN as one XLA
  loop over blocks, :mod:`modjax.kernels.xla_expert_ffn`), unsort and combine. Memory
  grows as T*K*D. A SwiGLU FFN with ``F < D`` on the grouped path is one op with the
  combine (:func:`modjax.kernels.grouped_swiglu.swiglu_ffn_combine`), whose backward
  keeps neither the experts' output rows nor their hidden rows.
* ``"capacity"`` (GShard/Switch with gathers): each expert gets ``routing.capacity``
  slots (T when the routing is dropless); assignments with ``kept`` False are dropped.
* ``"einsum"``: the one-hot ``[T, E, C]`` dispatch/combine einsums of GShard
  (Lepikhin et al. 2021) and Switch (Fedus et al. 2022); the reference formulation.

:func:`moe_ffn_reference` loops over experts with masks: the slow twin of all three.

Expert-parallel seam: :func:`make_expert_fn` returns an
``expert_fn(params, x_sorted [N, D], group_sizes [E]) -> [N, D]`` (rows sorted by
expert, padding rows after ``sum(group_sizes)``), the interface of
:func:`modjax.parallel.expert_parallel.expert_parallel_apply`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from modjax.computation import matmul
from modjax.kernels import grouped_matmul as gm
from modjax.kernels import grouped_swiglu, xla_expert_ffn
from modjax.routing.dispatch import slot_maps
from modjax.routing.types import DenseRouting, Routing
from modjax.typing import Array, PyTree

#: activation name -> names of its input projections (each [..., D, F]).
ACTIVATIONS: dict[str, tuple[str, ...]] = {
    "swiglu": ("wi_gate", "wi_up"),
    "gelu": ("wi",),
}
STRATEGIES = ("dropless", "capacity", "einsum")


def _check_activation(activation: str) -> tuple[str, ...]:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def _hidden(activation: str, proj: dict[str, Array]) -> Array:
    if activation == "swiglu":
        gate = proj["wi_gate"].astype(jnp.float32)
        return (jax.nn.silu(gate) * proj["wi_up"].astype(jnp.float32)).astype(proj["wi_up"].dtype)
    h = proj["wi"]
    return jax.nn.gelu(h.astype(jnp.float32), approximate=True).astype(h.dtype)


@functools.cache
def _hidden_fn(activation: str) -> Callable[[tuple[Array, ...]], Array]:
    """:func:`_hidden` on a tuple of projections, one (hashable) function per activation."""
    names = ACTIVATIONS[activation]
    return lambda proj: _hidden(activation, dict(zip(names, proj, strict=True)))


def check_ffn_params(params: PyTree, activation: str, *, experts: bool) -> tuple[int, int]:
    """Validate FFN (or expert FFN) params; returns ``(D, F)``."""
    names = _check_activation(activation)
    expected = set(names) | {"wo"}
    if not isinstance(params, dict) or set(params) != expected:
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"{activation} params must have keys {sorted(expected)}, got {got}")
    nd = 3 if experts else 2
    shapes = {k: v.shape for k, v in params.items()}
    if any(len(s) != nd for s in shapes.values()):
        raise ValueError(f"params must all be rank {nd}, got shapes {shapes}")
    d, f = params[names[0]].shape[-2:]
    for n in names:
        if params[n].shape[-2:] != (d, f):
            raise ValueError(f"params[{n!r}] must be [..., {d}, {f}], got {shapes}")
    if params["wo"].shape[-2:] != (f, d):
        raise ValueError(f"params['wo'] must be [..., {f}, {d}] (F, D), got {shapes['wo']}")
    if experts and len({s[0] for s in shapes.values()}) != 1:
        raise ValueError(f"expert params must share the leading E axis, got {shapes}")
    return d, f


def ffn(x: Array, params: PyTree, *, activation: str = "swiglu") -> Array:
    """Dense FFN ``[..., D] -> [..., D]`` in ``x.dtype`` (float32 accumulation)."""
    names = _check_activation(activation)
    d, _ = check_ffn_params(params, activation, experts=False)
    if x.shape[-1] != d:
        raise ValueError(f"x width {x.shape[-1]} does not match params width D={d}")
    proj = {n: matmul.dot(x, params[n]) for n in names}
    return matmul.dot(_hidden(activation, proj), params["wo"])


# --------------------------------------------------------------------------------------
# grouped expert FFN (the dropless fast path and the expert-parallel seam)


def default_block_size(impl: str = "auto") -> int:
    """Rows per block of the block-padded layout for grouped-matmul ``impl``: 128 (a
    tensor-core tile) for the GPU kernels; 32 for the fused XLA loop, whose dots span
    whole runs of a group's blocks, so small blocks cost no matmul speed and waste fewer
    padding rows (2-core CPU, fwd+bwd against dense: cpu-a 0.78 -> 0.88, cpu-b 0.63 ->
    0.72 going from 128 to 32, ``benchmarks/RESULTS.md``)."""
    return 32 if gm.runs_on_xla(impl) else 128


def expert_ffn_blocks(
    x: Array,
    params: PyTree,
    layout: gm.GroupLayout,
    *,
    activation: str,
    block_size: int,
    impl: str = "auto",
    interpret: bool = False,
) -> Array:
    """Expert FFN on block-padded rows ``[Nb * bs, D]`` (see :func:`gm.sort_to_blocks`).

    Three grouped matmuls with the activation between them (SwiGLU's as one op,
    :func:`modjax.kernels.grouped_swiglu.swiglu_ffn`, whose activation lives in the
    kernels' epilogues on a Hopper GPU); where the grouped matmuls would be XLA loops (off
    the GPU), one fused loop over blocks instead (:mod:`modjax.kernels.xla_expert_ffn`, the
    same function).
    """
    names = _check_activation(activation)
    if gm.runs_on_xla(impl):
        w_in = tuple(params[n].astype(x.dtype) for n in names)
        return xla_expert_ffn.expert_ffn(x, w_in, params["wo"].astype(x.dtype),
                                         layout.group_start, _hidden_fn(activation),
                                         block_size=block_size)  # fmt: skip
    mm = functools.partial(
        gm.gmm, layout=layout, block_size=block_size, impl=impl, interpret=interpret
    )
    w_out = params["wo"].astype(x.dtype)
    if activation == "swiglu":  # one op: on a Hopper GPU the activation is in two kernels
        w_gate, w_up = (params[n].astype(x.dtype) for n in names)
        return grouped_swiglu.swiglu_ffn(x, w_gate, w_up, w_out, layout, block_size=block_size,
                                         impl=impl, interpret=interpret)  # fmt: skip
    return mm(_hidden(activation, {n: mm(x, params[n].astype(x.dtype)) for n in names}), w_out)


def grouped_ffn(
    params: PyTree,
    x: Array,
    group_sizes: Array,
    *,
    activation: str = "swiglu",
    block_size: int | None = None,
    impl: str = "auto",
    interpret: bool = False,
) -> Array:
    """Expert FFN on rows sorted by expert: ``[N, D]`` with ``group_sizes [E]`` -> ``[N, D]``.

    The first ``group_sizes[0]`` rows go to expert 0, and so on; rows past
    ``sum(group_sizes)`` are padding and come back as zeros.
    """
    block_size = block_size or default_block_size(impl)
    n = x.shape[0]
    num_experts = group_sizes.shape[0]
    ids = jnp.searchsorted(  # no while loop (gm.group_layout says why): [N, E] compares
        jnp.cumsum(group_sizes), jnp.arange(n), side="right", method="compare_all"
    )
    valid = ids < num_experts
    # Padding rows join no group: the kernels skip their blocks (an expert-parallel
    # buffer sized for the worst case is mostly padding; none of it is multiplied).
    position, source, layout = gm.sort_to_blocks(ids, num_experts, block_size, valid=valid)
    xp = gm.to_blocks(x, source, position, valid)
    yp = expert_ffn_blocks(
        xp,
        params,
        layout,
        activation=activation,
        block_size=block_size,
        impl=impl,
        interpret=interpret,
    )
    return gm.from_blocks(yp, position, source, valid).astype(x.dtype)


def make_expert_fn(
    activation: str = "swiglu", *, block_size: int | None = None, impl: str = "auto"
) -> Callable[[PyTree, Array, Array], Array]:
    """``expert_fn(params, x_sorted, group_sizes)`` for expert parallelism (module doc)."""
    _check_activation(activation)
    return functools.partial(grouped_ffn, activation=activation, block_size=block_size, impl=impl)


# --------------------------------------------------------------------------------------
# mixture of FFN experts


def _check_moe(x: Array, routing: Routing, params: PyTree, activation: str) -> None:
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a Routing, got {type(routing).__name__}")
    d, _ = check_ffn_params(params, activation, experts=True)
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"x must be [T, D={d}], got shape {x.shape}")
    e = params["wo"].shape[0]
    if routing.num_experts != e:
        raise ValueError(f"routing has num_experts={routing.num_experts}, params have E={e}")
    if routing.expert_index.shape[0] != x.shape[0]:
        raise ValueError(
            f"routing covers {routing.expert_index.shape[0]} tokens, x has {x.shape[0]}"
        )


def _dropless(x, routing, params, activation, block_size, impl, interpret):
    k = routing.expert_index.shape[1]
    ids = routing.expert_index.reshape(-1)
    kept = routing.kept.reshape(-1)  # dropped assignments (e.g. non-finite tokens): no rows
    position, source, layout = gm.sort_to_blocks(ids, routing.num_experts, block_size, kept)
    # Padded row p holds token source[p] // K (zeros for padding); both moves have
    # gather-only gradients (no scatter-adds).
    xp = gm.to_blocks(x, source, position, kept, k, impl=impl, interpret=interpret)
    if activation == "swiglu" and not gm.runs_on_xla(impl):
        w_gate, w_up, w_out = (params[n].astype(x.dtype) for n in (*ACTIVATIONS["swiglu"], "wo"))
        if grouped_swiglu.combine_in_backward(xp, w_gate, block_size, impl, interpret):
            return grouped_swiglu.swiglu_ffn_combine(
                xp, w_gate, w_up, w_out, layout, routing.weight, position, source, kept,
                x.dtype, block_size=block_size, impl=impl, interpret=interpret,
            )  # fmt: skip
    yp = expert_ffn_blocks(
        xp,
        params,
        layout,
        activation=activation,
        block_size=block_size,
        impl=impl,
        interpret=interpret,
    )
    return gm.combine_from_blocks(
        yp, routing.weight, position, source, kept, x.dtype, impl=impl, interpret=interpret
    )


def _batched_expert_ffn(xb: Array, params: PyTree, activation: str) -> Array:
    """``[E, C, D] -> [E, C, D]``: every expert on its own buffer."""
    names = ACTIVATIONS[activation]
    proj = {n: matmul.einsum("ecd,edf->ecf", xb, params[n].astype(xb.dtype)) for n in names}
    return matmul.einsum("ecf,efd->ecd", _hidden(activation, proj), params["wo"].astype(xb.dtype))


def _capacity(x, routing, params, activation):
    k = routing.expert_index.shape[1]
    e, c = routing.num_experts, routing.buffer_capacity()
    # each assignment's slot and each slot's assignment: gather-only gradients both ways
    position, source, placed = slot_maps(routing.expert_index, routing.slot, routing.kept, e, c)
    xb = gm.to_blocks(x, source, position, placed, k).reshape(e, c, -1)
    yb = _batched_expert_ffn(xb, params, activation).reshape(e * c, -1)
    return gm.combine_from_blocks(yb, routing.weight, position, source, placed, x.dtype)


def _einsum(x, routing, params, activation):
    dense = routing.to_dense()
    return _einsum_dense(x, dense.dispatch, dense.combine, params, activation)


def _einsum_dense(x, dispatch, combine, params, activation):
    xb = matmul.einsum("tec,td->ecd", dispatch.astype(x.dtype), x)
    yb = _batched_expert_ffn(xb, params, activation)
    return matmul.einsum("tec,ecd->td", combine.astype(x.dtype), yb)


def moe_ffn_dense_routing(
    x: Array, routing: DenseRouting, params: PyTree, *, activation: str = "swiglu"
) -> Array:
    """Experts from ``[T, E, C]`` dispatch/combine tensors (Soft MoE, expert choice):
    ``y = combine . FFN_e(dispatch^T x)``, ``[T, D] -> [T, D]``."""
    if not isinstance(routing, DenseRouting):
        raise TypeError(f"routing must be a DenseRouting, got {type(routing).__name__}")
    d, _ = check_ffn_params(params, activation, experts=True)
    e = params["wo"].shape[0]
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"x must be [T, D={d}], got shape {x.shape}")
    if routing.dispatch.shape[:2] != (x.shape[0], e):
        raise ValueError(
            f"routing.dispatch must be [T={x.shape[0]}, E={e}, C], got {routing.dispatch.shape}"
        )
    return _einsum_dense(x, routing.dispatch, routing.combine, params, activation)


def moe_ffn(
    x: Array,
    routing: Routing,
    params: PyTree,
    *,
    activation: str = "swiglu",
    strategy: str = "dropless",
    impl: str = "auto",
    block_size: int | None = None,
    interpret: bool = False,
) -> Array:
    """Mixture of FFN experts ``[T, D] -> [T, D]`` by one of ``STRATEGIES`` (module doc).

    Args:
      x: ``[T, D]`` tokens in the compute dtype.
      routing: a :class:`Routing` over E experts, K choices per token.
      params: expert FFN params with a leading E axis (module doc); cast to ``x.dtype``.
      activation: ``"swiglu"`` or ``"gelu"``.
      strategy: ``"dropless"``, ``"capacity"`` or ``"einsum"``.
      impl: grouped-matmul implementation for ``"dropless"`` (see
        :func:`modjax.kernels.grouped_matmul.gmm`).
      block_size: rows per block for ``"dropless"`` (default :func:`default_block_size`
        of ``impl``).
      interpret: run Pallas kernels in interpret mode.

    Returns:
      ``[T, D]`` in ``x.dtype``.
    """
    _check_moe(x, routing, params, activation)
    if strategy == "dropless":
        return _dropless(
            x, routing, params, activation, block_size or default_block_size(impl), impl, interpret
        )
    if strategy == "capacity":
        return _capacity(x, routing, params, activation)
    if strategy == "einsum":
        return _einsum(x, routing, params, activation)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


def moe_ffn_reference(x: Array, routing: Routing, params: PyTree, *, activation="swiglu"):
    """Slow twin of :func:`moe_ffn`: every expert on every token, masked by the routing."""
    _check_moe(x, routing, params, activation)
    w = routing.dense_weights()
    y = jnp.zeros(x.shape, jnp.float32)
    for e in range(routing.num_experts):
        pe = {n: p[e] for n, p in params.items()}
        y = y + w[:, e : e + 1] * ffn(x, pe, activation=activation).astype(jnp.float32)
    return y.astype(x.dtype)
