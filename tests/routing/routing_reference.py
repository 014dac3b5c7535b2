"""Plain numpy references shared by the routing tests."""

import numpy as np


def softmax(x):
    x = np.asarray(x, np.float64)
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def top_k_reference(logits, k, capacity=None, batch_priority=False, bias=None, renorm=True):
    """Loop reference of top-k routing with queues; returns dict of numpy arrays."""
    logits = np.asarray(logits, np.float64)
    t, e = logits.shape
    p = softmax(logits)
    sel = logits + (0 if bias is None else np.asarray(bias, np.float64))
    idx = np.argsort(-sel, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(p, idx, -1)
    if renorm and k > 1:
        w = w / w.sum(-1, keepdims=True)
    order = list(range(t))
    if batch_priority:
        order = list(np.argsort(-p[np.arange(t), idx[:, 0]], kind="stable"))
    counts = np.zeros(e, int)
    slot = np.zeros((t, k), int)
    for j in range(k):
        for tok in order:
            slot[tok, j] = counts[idx[tok, j]]
            counts[idx[tok, j]] += 1
    kept = np.ones((t, k), bool) if capacity is None else slot < capacity
    return {
        "expert_index": idx,
        "weight": np.where(kept, w, 0.0),
        "kept": kept,
        "slot": slot,
        "probs": p,
    }


def dispatch_reference(x, expert_index, slot, kept, num_experts, capacity):
    t, d = x.shape
    buf = np.zeros((num_experts, capacity, d))
    for tok in range(t):
        for j in range(expert_index.shape[1]):
            if kept[tok, j]:
                buf[expert_index[tok, j], slot[tok, j]] += x[tok]
    return buf


def combine_reference(out, expert_index, slot, kept, weight):
    t, k = expert_index.shape
    y = np.zeros((t, out.shape[-1]))
    for tok in range(t):
        for j in range(k):
            if kept[tok, j]:
                y[tok] += weight[tok, j] * out[expert_index[tok, j], slot[tok, j]]
    return y


def rnd(seed, shape, scale=1.0):
    """Standard normal float32 test input from numpy (no per-shape jax compile)."""
    import jax.numpy as jnp

    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)
