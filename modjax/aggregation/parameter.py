"""Parameter aggregation: merge the parameters of modules that share one structure.

Every function takes parameter pytrees of any structure (dicts, ``nnx.State``, tuples)
whose leaves are arrays, and checks up front that they agree in structure and leaf
shapes (a ValueError naming the mismatch otherwise).

* :func:`weighted_average`: ``sum_e w_e theta_e`` (model soups, Wortsman et al. 2022;
  Fisher/"Average" merging).
* :func:`smear_merge`: SMEAR (Muqeeth et al. 2023, "Soft Merging of Experts with Adaptive
  Routing"): per-example weights ``[N, E]`` merge stacked expert parameters ``[E, ...]``
  into one parameter set per example ``[N, ...]``, then one forward pass runs.
* :func:`task_vector`, :func:`task_arithmetic`: ``tau = theta_ft - theta_0`` and
  ``theta_0 + sum_t lambda_t tau_t``; a negative ``lambda`` negates (forgets) a task
  (Ilharco et al. 2023, "Editing Models with Task Arithmetic").
* :func:`ties_merge`: TIES-merging (Yadav et al. 2023): trim each task vector to its
  largest-magnitude fraction, elect a sign per entry by total mass, average only the
  entries that agree with it (disjoint mean).
* :func:`dare`: DARE (Yu et al. 2024, "Language Models are Super Mario"): drop each delta
  entry with probability p and rescale the survivors by ``1 / (1 - p)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from modjax.typing import Array, ArrayLike, PRNGKey, PyTree


def _describe(tree: PyTree) -> str:
    return str(jax.tree_util.tree_structure(tree))


def check_same_structure(trees: Sequence[PyTree], name: str = "trees") -> None:
    """Raise a ValueError unless all pytrees share one structure and leaf shapes."""
    if isinstance(trees, dict) or not isinstance(trees, Sequence) or len(trees) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of pytrees, got {type(trees)}")
    ref = jax.tree_util.tree_structure(trees[0])
    ref_leaves = jax.tree_util.tree_leaves(trees[0])
    for i, tree in enumerate(trees[1:], start=1):
        struct = jax.tree_util.tree_structure(tree)
        if struct != ref:
            raise ValueError(
                f"{name}[{i}] has a different structure from {name}[0]: {struct} vs {ref}"
            )
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree), ref_leaves):
            sa, sb = jnp.shape(a), jnp.shape(b)
            if sa != sb:
                where = jax.tree_util.keystr(path)
                raise ValueError(f"{name}[{i}]{where} has shape {sa}, {name}[0] has {sb}")


def stack_trees(trees: Sequence[PyTree]) -> PyTree:
    """Stack E pytrees of one structure into one whose leaves have a leading E axis."""
    check_same_structure(trees)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _leading_size(stacked: PyTree, name: str) -> int:
    leaves = jax.tree_util.tree_leaves(stacked)
    if not leaves:
        raise ValueError(f"{name} has no array leaves: {_describe(stacked)}")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"{name} leaves must share one leading (module) axis E, got leading sizes "
            f"{sorted(map(str, sizes))}"
        )
    return sizes.pop()


def _check_float_leaves(tree: PyTree, name: str) -> None:
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} must be a float array to be merged, "
                f"got dtype {jnp.result_type(x)}"
            )


def smear_merge(stacked: PyTree, weights: ArrayLike) -> PyTree:
    """SMEAR: per-example merged parameters ``theta_n = sum_e w[n, e] theta_e``.

    Args:
      stacked: pytree whose float leaves have a leading module axis ``[E, ...]``.
      weights: ``[N, E]`` routing weights (N examples; one-hot rows select one module).

    Returns:
      The pytree with leaves ``[N, ...]`` (float32 accumulation, leaf dtypes kept). Run
      the module once per example with ``jax.vmap`` over N (Muqeeth et al. 2023).
    """
    weights = jnp.asarray(weights)
    e = _leading_size(stacked, "stacked")
    if weights.ndim != 2 or weights.shape[1] != e:
        raise ValueError(
            f"weights must be [N, E] with E = {e} (one weight per module), "
            f"got shape {weights.shape}"
        )
    _check_float_leaves(stacked, "stacked")
    w = weights.astype(jnp.float32)

    def merge(leaf):
        out = jnp.einsum("ne,e...->n...", w, leaf.astype(jnp.float32))
        return out.astype(leaf.dtype)

    return jax.tree.map(merge, stacked)


def weighted_average(trees: Sequence[PyTree], weights: ArrayLike | None = None) -> PyTree:
    """``sum_e w_e theta_e`` over E pytrees of one structure (uniform when ``weights`` is
    None). Weights are used as given (normalize them yourself for a convex average).

    Args:
      trees: E parameter pytrees with identical structure and leaf shapes.
      weights: ``[E]``.
    """
    check_same_structure(trees)
    e = len(trees)
    w = jnp.full((e,), 1.0 / e) if weights is None else jnp.asarray(weights)
    if w.shape != (e,):
        raise ValueError(f"weights must be [E] = ({e},) (one per tree), got shape {w.shape}")
    merged = smear_merge(stack_trees(trees), w[None])
    return jax.tree.map(lambda x: x[0], merged)


def task_vector(finetuned: PyTree, base: PyTree) -> PyTree:
    """``tau = theta_ft - theta_0`` (Ilharco et al. 2023)."""
    check_same_structure([finetuned, base], "[finetuned, base]")
    return jax.tree.map(jnp.subtract, finetuned, base)


def _scales(scales, n: int) -> Array:
    s = jnp.ones((n,)) if scales is None else jnp.asarray(scales, jnp.float32)
    if s.ndim == 0:
        s = jnp.full((n,), s)
    if s.shape != (n,):
        raise ValueError(
            f"scales must be a scalar or [N] = ({n},) (one per task vector), got shape {s.shape}"
        )
    return s


def task_arithmetic(
    base: PyTree, task_vectors: Sequence[PyTree], scales: ArrayLike | None = None
) -> PyTree:
    """``theta_0 + sum_t lambda_t tau_t`` (Ilharco et al. 2023).

    Args:
      base: the pre-trained parameters ``theta_0``.
      task_vectors: N task vectors of ``base``'s structure (:func:`task_vector`).
      scales: scalar or ``[N]`` ``lambda_t``; negative entries negate a task (forgetting).

    Example:
      >>> forget = task_arithmetic(theta0, [task_vector(toxic, theta0)], -1.0)
    """
    check_same_structure([base, *task_vectors], "[base, *task_vectors]")
    s = _scales(scales, len(task_vectors))
    total = smear_merge(stack_trees(list(task_vectors)), s[None])
    return jax.tree.map(lambda b, t: (b + t[0].astype(b.dtype)).astype(b.dtype), base, total)


def _check_fraction(name: str, value, *, upper_open: bool) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and (0 <= value < 1 if upper_open else 0 < value <= 1)
    if not ok:
        interval = "[0, 1)" if upper_open else "(0, 1]"
        raise ValueError(f"{name} must be a float in {interval}, got {value!r}")
    return float(value)


def trim_top_magnitude(x: Array, density: float) -> Array:
    """Keep the ``ceil(density * size)`` largest-magnitude entries of ``x``, zero the rest
    (ties at the threshold broken by position, so exactly that many are kept)."""
    density = _check_fraction("density", density, upper_open=False)
    size = x.size
    # ceil, with slack so that e.g. 0.2 * 5 (= 1.0000000000000002) keeps 1, not 2
    keep = max(1, min(size, math.ceil(density * size - 1e-9)))
    if keep >= size:
        return x
    flat = jnp.abs(x.reshape(-1))
    _, idx = jax.lax.top_k(flat, keep)
    mask = jnp.zeros((size,), bool).at[idx].set(True)
    return jnp.where(mask.reshape(x.shape), x, jnp.zeros_like(x))


def ties_merge(
    task_vectors: Sequence[PyTree], *, density: float = 0.2, scales: ArrayLike | None = None
) -> PyTree:
    """TIES-merging of N task vectors into one (Yadav et al. 2023).

    Per leaf (each parameter tensor, as PEFT and mergekit do): (1) trim each task vector
    to its top ``density`` fraction by magnitude; (2) elect the sign of every entry as the
    sign of the trimmed vectors' sum (the direction with the larger total mass); (3)
    disjoint mean: average only the trimmed entries whose sign equals the elected one
    (zero where none does). Add the result, scaled by lambda, to the base parameters
    (``task_arithmetic(base, [merged], lam)``).

    Args:
      task_vectors: N pytrees of one structure (:func:`task_vector`).
      density: fraction of entries kept per task vector, in ``(0, 1]``.
      scales: optional scalar or ``[N]`` per-task weights applied before trimming.

    Returns:
      The merged task vector (leaf dtypes kept).
    """
    check_same_structure(task_vectors, "task_vectors")
    _check_fraction("density", density, upper_open=False)
    s = _scales(scales, len(task_vectors))
    stacked = stack_trees(list(task_vectors))
    _check_float_leaves(stacked, "task_vectors")

    def merge(leaf):
        t = leaf.astype(jnp.float32) * s.reshape((-1,) + (1,) * (leaf.ndim - 1))
        trimmed = jax.vmap(lambda v: trim_top_magnitude(v, density))(t)
        sign = jnp.sign(trimmed.sum(0))
        agree = (jnp.sign(trimmed) == sign) & (trimmed != 0)
        count = agree.sum(0)
        total = jnp.where(agree, trimmed, 0.0).sum(0)
        return (total / jnp.maximum(count, 1)).astype(leaf.dtype)

    return jax.tree.map(merge, stacked)


def dare(delta: PyTree, drop_rate: float, key: PRNGKey) -> PyTree:
    """DARE: drop each delta entry with probability ``drop_rate``, rescale the rest.

    ``out = delta * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` independently per entry,
    so ``E[out] = delta`` (Yu et al. 2024). Apply it to task vectors before
    :func:`task_arithmetic` or :func:`ties_merge`.

    Args:
      delta: a pytree of float arrays (a task vector).
      drop_rate: p in ``[0, 1)``.
      key: a PRNG key; each leaf uses its own split of it.
    """
    p = _check_fraction("drop_rate", drop_rate, upper_open=True)
    _check_float_leaves(delta, "delta")
    leaves, treedef = jax.tree_util.tree_flatten(delta)
    if not leaves:
        return delta
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, x in zip(keys, leaves):
        keep = jax.random.bernoulli(k, 1.0 - p, jnp.shape(x))
        out.append(jnp.where(keep, x / (1.0 - p), jnp.zeros_like(x)).astype(x.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


__all__ = [
    "check_same_structure",
    "dare",
    "smear_merge",
    "stack_trees",
    "task_arithmetic",
    "task_vector",
    "ties_merge",
    "trim_top_magnitude",
    "weighted_average",
]
