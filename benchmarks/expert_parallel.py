"""Expert parallelism: bytes moved per device per step and the all-to-all time share.

For one MoE FFN layer (``expert_parallel_apply`` with the stock gelu ``ragged_dot``
experts) on a mesh over all local devices, reports

* communication volume per device per training step (forward + backward): the send
  buffer ``[ep * B, D]`` goes out twice in the forward pass (dispatch, combine) and twice
  in the backward pass (their transposes), ``(ep - 1) / ep`` of it to other devices;
  both the analytic count and the one read off the compiled HLO (all-to-all operands);
  and how much of it is payload (routed rows) rather than padding;
* time of the layer (forward) and of a step (forward + backward + SGD update), and of
  the four all-to-alls alone on the same buffers: their share of the step.

On simulated CPU devices the times are not meaningful (every "device" shares the host's
cores and an all-to-all is a memcpy); read the volumes. On GPUs the times are real.

Usage:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
    PYTHONPATH=. python benchmarks/expert_parallel.py --mesh data=2,expert=4
  PYTHONPATH=. python benchmarks/expert_parallel.py --mesh expert=-1 --dtype bfloat16 \\
    --tokens 16384 --d 1024 --f 4096 --experts 64 --k 2       # on a GPU host

Recorded results (2026-11-29, 8 simulated CPU devices on 2 shared cores, jax 0.10.2,
T=4096 D=256 F=512 E=16 K=2 float32; per device per training step; the step's HLO has 5
all-to-alls: 2 forward + 2 backward data buffers and 1 of per-expert counts):

  mesh               buffer B   all-to-all data  crossing devices  payload share
  data=2,expert=4    1024 (dropless)  16 MiB     12 MiB            25.0%
  data=2,expert=4    512 (cf 2.0)      8 MiB      6 MiB            50.0%  overflow 0
  expert=8           1024 (dropless)  32 MiB     28 MiB            12.5%
  expert=8           256 (cf 2.0)      8 MiB      7 MiB            50.0%  overflow 0

The dropless bound (every local assignment to one device) costs ``ep`` times the average
volume; with balanced routing ``capacity_factor=2`` never overflowed here and cut the
CPU step time 2-4x (the expert compute runs over all ``ep * B`` received rows). CPU
times (all-to-alls alone 1-3% of the step) say nothing about a GPU interconnect.
"""

from __future__ import annotations

import argparse
import math
import re
import time

import jax
import jax.numpy as jnp

from modjax.parallel import expert_parallel_apply, make_ffn_expert_fn, send_buffer_size
from modjax.parallel.expert_parallel import token_axes
from modjax.routing.types import Routing
from modjax.sharding import make_mesh

# An all-to-all in compiled HLO: synchronous ``= SHAPE all-to-all(`` (XLA:CPU; also the
# body of an async-wrapped one) or GPU's async ``= ((OPERANDS), RESULTS) all-to-all-start(``.
_HLO_A2A = re.compile(r"=\s*(\S.*?)\s+all-to-all(-start)?\(")
_HLO_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2}


def _parse_mesh(text: str) -> dict[str, int]:
    sizes = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        sizes[name.strip()] = int(value)
    return sizes


def hlo_all_to_alls(hlo: str) -> list[tuple[str, int]]:
    """``(dtype, elements per device)`` of every all-to-all of compiled (per-device) HLO.

    A tuple-shaped all-to-all (one operand per peer, as XLA:CPU lowers a tiled one) is
    one op of all its elements; an async ``all-to-all-start`` (GPU) counts its operands
    only (its shape also holds the equal-sized results, and scalar context).
    """
    out = []
    for m in _HLO_A2A.finditer(hlo):
        arrays = [(t, d) for t, d in _HLO_SHAPE.findall(m.group(1)) if d]
        if m.group(2):  # -start: operands then results, equal in size
            arrays = arrays[: len(arrays) // 2]
        if arrays:
            sizes = [math.prod(int(x) for x in dims.split(",")) for _, dims in arrays]
            out.append((arrays[0][0], sum(sizes)))
    return out


def nbytes(dtype: str, elements: int) -> int:
    """Bytes of ``elements`` of an HLO element type (``bf16``, ``f32``, ...)."""
    return elements * _BYTES.get(dtype, 8 if dtype.endswith("64") else 4)


def _hlo_all_to_all_bytes(hlo: str) -> tuple[int, int]:
    """(count, bytes of results) of the all-to-all ops in compiled (per-device) HLO."""
    ops = hlo_all_to_alls(hlo)
    return len(ops), sum(nbytes(t, n) for t, n in ops)


def _timeit(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mesh", default="data=2,expert=4")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--f", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()

    mesh = make_mesh(**_parse_mesh(a.mesh))
    dtype = jnp.dtype(a.dtype)
    ep = mesh.shape["expert"]
    shards = math.prod(mesh.shape[ax] for ax in token_axes(mesh))
    t_local = a.tokens // shards
    b = send_buffer_size(t_local, a.k, ep, a.capacity_factor)

    ks = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(ks[0], (a.tokens, a.d), dtype)
    router_w = jax.random.normal(ks[1], (a.d, a.experts), jnp.float32) * 0.1
    params = {
        "w_in": (jax.random.normal(ks[2], (a.experts, a.d, a.f)) * a.d**-0.5).astype(dtype),
        "w_out": (jax.random.normal(ks[3], (a.experts, a.f, a.d)) * a.f**-0.5).astype(dtype),
    }
    fn = make_ffn_expert_fn()

    def layer(x, router_w, params):
        probs = jax.nn.softmax(x.astype(jnp.float32) @ router_w, axis=-1)
        w, i = jax.lax.top_k(probs, a.k)
        routing = Routing(
            i.astype(jnp.int32), w, jnp.ones(i.shape, bool), jnp.zeros_like(i), probs, a.experts
        )
        return expert_parallel_apply(
            x, routing, fn, params, mesh=mesh, capacity_factor=a.capacity_factor
        )

    def loss(router_w, params, x):
        y, stats = layer(x, router_w, params)
        return jnp.mean(jnp.square(y.astype(jnp.float32))), stats

    @jax.jit
    def step(router_w, params, x):
        # dx is kept live: in a model it flows on to the layers below.
        (l, stats), (g_r, g_p, g_x) = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
            router_w, params, x
        )
        params = jax.tree.map(lambda p, g: p - 0.1 * g.astype(p.dtype), params, g_p)
        return router_w - 0.1 * g_r, params, l + 0 * jnp.sum(g_x), stats

    forward = jax.jit(layer)

    token_sharding = jax.NamedSharding(mesh, jax.P(token_axes(mesh) or None, None))
    expert_sharding = jax.NamedSharding(mesh, jax.P("expert"))
    x = jax.device_put(x, token_sharding)
    params = jax.device_put(params, expert_sharding)

    # --- volumes
    item = dtype.itemsize
    buffer_bytes = ep * b * a.d * item
    cross = (ep - 1) / ep
    analytic = 4 * buffer_bytes * cross + 2 * ep * (a.experts // ep) * 4 * cross
    hlo_step = step.lower(router_w, params, x).compile().as_text()
    n_a2a, hlo_bytes = _hlo_all_to_all_bytes(hlo_step)
    _, _, _, stats = step(router_w, params, x)
    payload_rows = int(stats.assignments) / shards  # routed rows per device, on average
    payload = 4 * payload_rows * a.d * item * cross

    print(f"devices={jax.device_count()} ({jax.devices()[0].platform}) mesh={dict(mesh.shape)}")
    print(
        f"T={a.tokens} D={a.d} F={a.f} E={a.experts} K={a.k} dtype={dtype.name} "
        f"tokens/device={t_local} ep={ep} buffer rows/dest B={b} "
        f"(capacity_factor={a.capacity_factor}, dropless bound {t_local * a.k})"
    )
    print(
        f"per device per step: all-to-all buffers {4 * buffer_bytes / 2**20:.2f} MiB "
        f"(4 x {buffer_bytes / 2**20:.2f} MiB), crossing devices {analytic / 2**20:.2f} MiB; "
        f"HLO: {n_a2a} all-to-alls, {hlo_bytes / 2**20:.2f} MiB of results (own chunk incl.); "
        f"payload {payload / 2**20:.2f} MiB ({payload / max(analytic, 1):.1%} of crossing)"
    )
    print(
        f"overflow={int(stats.overflow)} max_pair_load={int(stats.max_pair_load)} "
        f"assignments={int(stats.assignments)}"
    )

    # --- times
    t_layer = _timeit(forward, x, router_w, params, repeats=a.repeats)
    t_step = _timeit(step, router_w, params, x, repeats=a.repeats)

    axes = tuple(dict.fromkeys((*token_axes(mesh), "expert")))

    def exchanges(buf):
        for _ in range(4):
            buf = jax.lax.all_to_all(buf, "expert", 0, 0, tiled=True) * 1.0001
        return buf

    bufs = jax.device_put(
        jnp.ones((shards * ep * b, a.d), dtype), jax.NamedSharding(mesh, jax.P(axes, None))
    )
    a2a = jax.jit(
        jax.shard_map(exchanges, mesh=mesh, in_specs=jax.P(axes, None), out_specs=jax.P(axes))
    )
    t_a2a = _timeit(a2a, bufs, repeats=a.repeats)
    print(
        f"layer (fwd) {t_layer * 1e3:.2f} ms, step (fwd+bwd+update) {t_step * 1e3:.2f} ms, "
        f"4 all-to-alls alone {t_a2a * 1e3:.2f} ms = {t_a2a / t_step:.1%} of the step"
    )
    if jax.devices()[0].platform == "cpu":
        print("(simulated CPU devices: times are not meaningful, volumes are)")
    if a.capacity_factor is None and int(stats.overflow):
        raise AssertionError(f"dropless buffer overflowed: {int(stats.overflow)}")


if __name__ == "__main__":
    main()
