"""Quickstart: route a batch of random tokens with every router and print their loads.

Run ``python -m modjax.demo``. It builds a :class:`modjax.layers.router.Router` per
strategy on 4 sequences x 64 tokens of width 32 over 8 experts (inputs shifted so the
learned-gate routers start unbalanced, as an untrained router often is), routes the
batch once, and prints one row of :func:`modjax.routing.routing_metrics` per router.
It then runs 200 auxiliary-loss-free bias updates (Wang et al. 2024) on the top-k router
and prints its load again.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from modjax.layers.router import Router

BATCH, SEQ, WIDTH, EXPERTS = 4, 64, 32, 8

ROUTERS = [
    ("top_k k=2 dropless", dict(strategy="top_k", k=2)),
    ("top_k k=2 cf=1.0", dict(strategy="top_k", k=2, capacity_factor=1.0)),
    ("top_k k=1 cf=1.0 BPR", dict(strategy="top_k", k=1, capacity_factor=1.0, batch_priority=True)),
    ("expert_choice cf=1", dict(strategy="expert_choice", capacity_factor=1.0)),
    ("balanced (Sinkhorn)", dict(strategy="balanced", k=1, temperature=0.1)),
    ("soft (dense mixture)", dict(strategy="soft")),
    ("soft_moe 2 slots", dict(strategy="soft_moe", num_slots=2)),
    ("gumbel hard k=1", dict(strategy="gumbel", k=1)),
    ("straight_through k=1", dict(strategy="straight_through", k=1)),
    ("hash k=1", dict(strategy="hash", k=1)),
    ("task (4 tasks)", dict(strategy="task")),
    ("top_k k=1 sequence-level", dict(strategy="top_k", k=1, granularity="sequence")),
]

_COLUMNS = ("max_load", "load_cv", "dropped_fraction", "entropy", "confidence")


def _row(name: str, metrics: dict) -> str:
    cells = [f"{float(metrics[c]):>11.3f}" for c in _COLUMNS]
    return f"{name:<26}" + "".join(cells)


def main() -> None:
    key_x, key_ids = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (BATCH, SEQ, WIDTH)) + 0.5
    token_ids = jax.random.randint(key_ids, (BATCH, SEQ), 0, 1000)
    task_ids = jnp.arange(BATCH) % 4
    print(
        f"Routing {BATCH}x{SEQ} random tokens (width {WIDTH}) over {EXPERTS} experts with "
        f"each router (train=True: jitter/Gumbel noise on).\nLoad is per expert over the "
        f"whole batch; max_load = max/mean (1 is balanced); load_cv = std/mean;\n"
        f"dropped = share of assignments over capacity (tokens no expert took, for "
        f"expert choice);\nentropy and confidence (mean top-1 prob) of the router probs.\n"
        f"The sequence-level router makes one decision per sequence ({BATCH} sequences "
        f"over {EXPERTS} experts,\nso its max_load is at least {EXPERTS / BATCH:g}).\n"
    )
    header = ("max_load", "load_cv", "dropped", "entropy", "confidence")
    print(f"{'router':<26}" + "".join(f"{c:>11}" for c in header))
    for name, kwargs in ROUTERS:
        router = Router(WIDTH, EXPERTS, jitter=0.01, rngs=nnx.Rngs(0, router=1), **kwargs)
        out = router(x, train=True, token_ids=token_ids, task_ids=task_ids)
        print(_row(name, out.metrics))

    router = Router(WIDTH, EXPERTS, k=2, aux_loss_free=True, rngs=nnx.Rngs(0))
    before = router(x).metrics
    step = nnx.jit(lambda r, x: r.update_bias(r(x).routing, 0.01))
    for _ in range(200):
        step(router, x)
    after = router(x).metrics
    print("\nAuxiliary-loss-free balancing of top_k k=2 (200 bias updates, rate 0.01):")
    print(_row("  before", before))
    print(_row("  after", after))


if __name__ == "__main__":
    main()
