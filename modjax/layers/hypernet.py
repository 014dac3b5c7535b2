"""Hypernetwork layers: module parameters generated from a task embedding (HyperFormer,
Karimi Mahabadi et al. 2021; Hyper-X, Üstün et al. 2022).

* :class:`HyperNetwork`: a two-layer MLP from an embedding ``z [..., Z]`` to the
  parameters of a module described by a spec (``name -> shape``), e.g.
  :func:`~modjax.computation.hypernet.lora_spec` or
  :func:`~modjax.computation.hypernet.adapter_spec`.
* :class:`HyperLoRA`: a LoRA around a base linear whose factors are generated, per
  example, from a learned task embedding; all parameters are :class:`HyperParam`.

Models are trees here (no shared Variables), so each wrapped layer owns its generator;
HyperFormer's cross-layer sharing needs the generator held once by the model and called
with ``task_layer_embedding`` -- :class:`HyperNetwork` supports that use directly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from modjax.computation import hypernet as hyper_lib
from modjax.computation import lora as lora_lib
from modjax.layers.lora import base_kernel
from modjax.layers.params import HyperParam
from modjax.typing import Array, ArrayLike, DType, Shape


class HyperNetwork(nnx.Module):
    """``z [..., Z] -> {name: [..., *shape]}`` (see :func:`generate_params`).

    Args:
      embed_dim: Z.
      spec: ordered ``name -> shape`` of the generated module.
      hidden_dim: width of the hidden layer.
      out_std: std of the output layer's init; small but nonzero, so that the generated
        module starts close to zero *and* gradients reach the embedding from step one.
    """

    def __init__(
        self,
        embed_dim: int,
        spec: dict[str, Shape],
        *,
        hidden_dim: int = 32,
        out_std: float = 1e-2,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        for name, v in (("embed_dim", embed_dim), ("hidden_dim", hidden_dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.spec = {k: tuple(v) for k, v in spec.items()}
        m = hyper_lib.param_count(self.spec)
        init = nnx.initializers.lecun_normal()
        self.hidden = HyperParam(init(rngs.params(), (embed_dim, hidden_dim), param_dtype))
        self.hidden_bias = HyperParam(jnp.zeros((hidden_dim,), param_dtype))
        out = out_std * jax.random.normal(rngs.params(), (hidden_dim, m), param_dtype)
        self.out = HyperParam(out)
        self.out_bias = HyperParam(jnp.zeros((m,), param_dtype))

    def __call__(self, z: Array) -> dict[str, Array]:
        gen = {k: getattr(self, k)[...] for k in hyper_lib.GENERATOR_KEYS}
        return hyper_lib.generate_params(z, gen, self.spec)


class HyperLoRA(nnx.Module):
    """``y = base(x) + (alpha / R) x A(t) B(t)`` with ``A, B`` generated from task ``t``'s
    embedding.

    Args:
      base: a module with a 2-D kernel ``[D, F]`` used as ``x @ kernel`` (nnx.Linear).
      rank: R.
      num_tasks: N, rows of the task embedding table ``[N, Z]``.
      task_dim: Z.
      hidden_dim: the generator's hidden width.
      alpha: LoRA alpha (default R).

    ``__call__(x, task=None)``: ``task`` is an int, or an int array ``[B]`` giving each
    example's task (``x`` is then ``[B, ..., D]``); None uses ``self.task`` (default 0).
    """

    def __init__(
        self,
        base: nnx.Module,
        rank: int,
        *,
        num_tasks: int,
        task_dim: int = 16,
        hidden_dim: int = 32,
        alpha: float | None = None,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kernel = base_kernel(base)[...]
        if kernel.ndim != 2 or isinstance(base, nnx.Einsum):
            raise ValueError(f"HyperLoRA needs a Linear-like base with kernel [D, F], got {base!r}")
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
        self.scaling = lora_lib.lora_scaling(rank if alpha is None else alpha, rank)
        self.base, self.rank, self.num_tasks, self.task = base, rank, num_tasks, 0
        emb = jax.random.normal(rngs.params(), (num_tasks, task_dim), param_dtype)
        self.task_embedding = HyperParam(emb, logical_axes=("task", None))
        spec = hyper_lib.lora_spec(kernel.shape[0], kernel.shape[1], rank)
        self.generator = HyperNetwork(
            task_dim, spec, hidden_dim=hidden_dim, param_dtype=param_dtype, rngs=rngs
        )

    def factors(self, task: ArrayLike) -> dict[str, Array]:
        """The generated ``{"a": [..., D, R], "b": [..., R, F]}`` of ``task`` (int or [B])."""
        task = jnp.asarray(task)
        if not jnp.issubdtype(task.dtype, jnp.integer) or task.ndim > 1:
            raise ValueError(f"task must be an int or an int array [B], got {task!r}")
        return self.generator(self.task_embedding[...][task])

    def __call__(self, x: Array, *args, task: ArrayLike | None = None, **kwargs) -> Array:
        y = self.base(x, *args, **kwargs)
        task = self.task if task is None else task
        f = self.factors(task)
        if f["a"].ndim == 2:
            low = (x @ f["a"]) @ f["b"]
        else:
            if x.shape[0] != f["a"].shape[0]:
                raise ValueError(f"task {f['a'].shape[:1]} must match x batch, x is {x.shape}")
            xf = x.reshape(x.shape[0], -1, x.shape[-1])
            low = jnp.einsum("btr,brf->btf", jnp.einsum("btd,bdr->btr", xf, f["a"]), f["b"])
            low = low.reshape(*x.shape[:-1], -1)
        return y + (self.scaling * low).astype(y.dtype)


__all__ = ["HyperLoRA", "HyperNetwork"]
