"""The optax optimizer of a run: schedule (linear warmup + cosine decay), gradient
clipping, and partitions by parameter type through ``optax.multi_transform``:

  ``"frozen"``  no update and no optimizer state (``optax.set_to_zero``)
  ``"router"``  parameters tagged ``RouterParam``: the optimizer at its own learning rate
  ``"default"`` every other trainable parameter

Clipping is applied per partition after partitioning, so frozen gradients are never
read (XLA then drops their computation).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import optax
from flax import nnx

from modjax.sharding import variable_tree

FREEZE_MODES = ("none", "base", "all_but_routers")
_OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": lambda lr, c: optax.adamw(
        lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay
    ),
    "adam": lambda lr, c: optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps),
    "sgd": lambda lr, c: optax.sgd(lr, momentum=c.b1 or None),
    "lion": lambda lr, c: optax.lion(lr, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay),
}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer settings (the ``optimizer`` section of an experiment config).

    Attributes:
      name: one of ``adamw``, ``adam``, ``sgd`` (b1 = momentum), ``lion``.
      learning_rate: peak learning rate; warmup_steps: linear warmup from 0.
      decay_steps: length of the cosine decay after warmup (0: constant after warmup).
      end_lr_ratio: final learning rate / peak.
      grad_clip_norm: global-norm clipping per partition (0: off).
      router_lr_ratio: learning rate of ``RouterParam`` parameters / the default one.
      freeze: ``"none"``; ``"base"`` (only ``ModuleParam`` and ``RouterParam`` train);
        ``"all_but_routers"``.
      freeze_patterns: regexes on ``"a/b/c"`` parameter paths that are frozen too.
    """

    name: str = "adamw"
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    decay_steps: int = 0
    end_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0
    router_lr_ratio: float = 1.0
    freeze: str = "none"
    freeze_patterns: Sequence[str] = ()

    def __post_init__(self):
        if self.name not in _OPTIMIZERS:
            raise ValueError(
                f"optimizer name must be one of {sorted(_OPTIMIZERS)}, got {self.name!r}"
            )
        if self.freeze not in FREEZE_MODES:
            raise ValueError(f"freeze must be one of {FREEZE_MODES}, got {self.freeze!r}")
        for n in ("learning_rate", "router_lr_ratio"):
            if not getattr(self, n) > 0:
                raise ValueError(f"{n} must be > 0, got {getattr(self, n)!r}")
        for n in ("warmup_steps", "decay_steps"):
            v = getattr(self, n)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{n} must be an int >= 0, got {v!r}")
        if self.grad_clip_norm < 0:
            raise ValueError(f"grad_clip_norm must be >= 0, got {self.grad_clip_norm!r}")


def learning_rate_schedule(config: OptimizerConfig, scale: float = 1.0) -> optax.Schedule:
    """Linear warmup from 0 to ``scale * learning_rate``, then cosine decay."""
    peak = config.learning_rate * scale
    warm = optax.linear_schedule(0.0, peak, max(config.warmup_steps, 1))
    if config.decay_steps:
        after = optax.cosine_decay_schedule(peak, config.decay_steps, alpha=config.end_lr_ratio)
    else:
        after = optax.constant_schedule(peak)
    if not config.warmup_steps:
        return after
    return optax.join_schedules([warm, after], [config.warmup_steps])


def param_labels(params_state: nnx.State, config: OptimizerConfig) -> dict:
    """A pure dict of partition labels (``"frozen"``, ``"router"``, ``"default"``) for
    the Variables of ``params_state``."""
    from modjax.layers.params import ModuleParam
    from modjax.layers.router import RouterParam

    patterns = [re.compile(p) for p in config.freeze_patterns]

    def label(path, v):
        is_router = isinstance(v, RouterParam)
        name = "/".join(str(p) for p in path)
        if any(p.search(name) for p in patterns):
            return "frozen"
        if config.freeze == "base" and not (is_router or isinstance(v, ModuleParam)):
            return "frozen"
        if config.freeze == "all_but_routers" and not is_router:
            return "frozen"
        return "router" if is_router else "default"

    return variable_tree(params_state, label)


def make_optimizer(config: OptimizerConfig, labels: dict) -> optax.GradientTransformation:
    """The partitioned optimizer for parameters labelled by :func:`param_labels`."""

    def chain(scale):
        parts = []
        if config.grad_clip_norm:
            parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
        parts.append(_OPTIMIZERS[config.name](learning_rate_schedule(config, scale), config))
        return optax.chain(*parts)

    transforms = {
        "default": chain(1.0),
        "router": chain(config.router_lr_ratio),
        "frozen": optax.set_to_zero(),
    }
    return optax.multi_transform(transforms, labels)


def count_by_label(params: dict, labels: dict) -> dict[str, int]:
    """Number of parameters per partition label."""
    import jax

    counts: dict[str, int] = {}
    for p, lab in zip(jax.tree.leaves(params), jax.tree.leaves(labels)):
        counts[lab] = counts.get(lab, 0) + int(p.size)
    return counts


__all__ = [
    "FREEZE_MODES",
    "OptimizerConfig",
    "count_by_label",
    "learning_rate_schedule",
    "make_optimizer",
    "param_labels",
]
