"""Model surgery: insert modules into any NNX model, freeze the rest, count, merge, save.

Modules are addressed by their path in the model tree, the attribute names and list
indices joined by ``/`` (``"layers/3/attn/query"``), matched in full by a glob pattern
(``*`` and ``?`` stay within one path component, ``**`` crosses ``/``, ``[qv]`` is a
character class: ``"layers/*/attn/[qv]*"``, ``"**/query"``), a regex (``regex=True``)
and/or a ``predicate(path, module) -> bool``.

Example ("LoRA of rank 8 on every attention query and value projection", then train only
the LoRAs):
  >>> add_lora(model, "**/attn/query", rank=8, rngs=nnx.Rngs(0))
  >>> add_lora(model, "**/attn/value", rank=8, rngs=nnx.Rngs(1))
  >>> count_params(model)           # ParamCount(trainable=..., total=...)
  >>> optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=TRAINABLE)
  >>> save_module_params(model, "lora.npz")   # only the module parameters
  >>> merge_and_unload(model)       # back to the base architecture, LoRAs folded in

A module-parameter file loads (:func:`load_module_params`) into a fresh copy of the base
model after the same surgery.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from modjax.computation import adapter as adapter_lib
from modjax.computation import sparse as sparse_lib
from modjax.files import atomic_save_npz
from modjax.layers.adapter import Adapter, ParallelAdapter, SequentialAdapter
from modjax.layers.hypernet import HyperLoRA
from modjax.layers.ia3 import IA3Scaled
from modjax.layers.lora import LoRA
from modjax.layers.params import ModuleParam, ModuleState
from modjax.layers.prompt import PrefixTuning, PromptedEmbed, PromptTuning
from modjax.layers.sparse import SparseDelta
from modjax.typing import Array

Predicate = Callable[[str, nnx.Module], bool]

#: Filters: what surgery trains, what stays frozen, what a module-parameter file holds.
TRAINABLE = ModuleParam
FROZEN = nnx.All(nnx.Param, nnx.Not(ModuleParam))
MODULE_STATE = nnx.Any(ModuleParam, ModuleState)

#: Wrapper types that surgery inserts; each keeps the wrapped module as ``.base``.
WRAPPERS = (
    LoRA,
    SparseDelta,
    IA3Scaled,
    SequentialAdapter,
    ParallelAdapter,
    PromptedEmbed,
    HyperLoRA,
)


class ParamCount(NamedTuple):
    """Parameter counts (entries, not arrays): trainable (module params) and total."""

    trainable: int
    total: int


def _path_str(path: tuple) -> str:
    return "/".join(str(k) for k in path)


def named_modules(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """All submodules (not the root) as ``(path, module)``, parents before children."""
    out = []
    for path, node in nnx.iter_graph(model):
        if path and isinstance(node, nnx.Module) and not any(str(k).startswith("_") for k in path):
            out.append((_path_str(path), node))
    return sorted(out, key=lambda pm: pm[0].count("/"))


def glob_to_regex(pattern: str) -> str:
    """The regex of a path glob: ``**/`` -> zero or more components, ``**`` -> ``.*``,
    ``*`` -> ``[^/]*``, ``?`` -> ``[^/]``, ``[...]`` kept (``[!...]`` negates), everything
    else literal."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in pattern[i + 1 :]:
            j = pattern.index("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "]") else i + 1)
            body = pattern[i + 1 : j]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append(f"[{body.replace(chr(92), chr(92) * 2)}]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def find_modules(
    model: nnx.Module,
    pattern: str | None = None,
    *,
    predicate: Predicate | None = None,
    regex: bool = False,
) -> list[tuple[str, nnx.Module]]:
    """The submodules whose path matches ``pattern`` and that satisfy ``predicate``.

    Args:
      model: any NNX module tree.
      pattern: a glob on the path (module docstring), or a regex with ``regex=True``;
        either must match the whole path; None matches every path.
      predicate: ``predicate(path, module) -> bool``, applied too.
      regex: treat ``pattern`` as a regular expression (``re.fullmatch``).

    Raises:
      ValueError: nothing matches; the message names the pattern and lists a few paths.
    """
    if pattern is None and predicate is None:
        raise ValueError("give a pattern, a predicate or both, got pattern=None, predicate=None")
    if pattern is not None and not isinstance(pattern, str):
        raise ValueError(f"pattern must be a string, got {pattern!r}")
    modules = named_modules(model)
    if pattern is None:
        match = lambda p: True
    else:
        try:
            compiled = re.compile(pattern if regex else glob_to_regex(pattern))
        except re.error as err:
            raise ValueError(f"pattern {pattern!r} is not a valid regex: {err}") from err
        match = lambda p: compiled.fullmatch(p) is not None
    found = [(p, m) for p, m in modules if match(p) and (predicate is None or predicate(p, m))]
    if not found:
        paths = [p for p, _ in modules]
        close = difflib.get_close_matches(pattern or "", paths, n=6, cutoff=0.3)
        shown = ", ".join(repr(p) for p in dict.fromkeys([*close, *paths[:8]]))
        shown += " ..." if len(paths) > 8 else ""
        what = f"pattern {pattern!r}" if pattern is not None else "pattern None"
        raise ValueError(
            f"{what} (regex={regex}, predicate={predicate}) matches no module of "
            f"{type(model).__name__}; available paths include: {shown}"
        )
    return found


def replace_module(model: nnx.Module, path: str, new: nnx.Module) -> None:
    """Put ``new`` at ``path`` (attribute or list index) in place of what is there."""
    keys = path.split("/")
    parent = model
    for k in keys[:-1]:
        parent = parent[int(k)] if isinstance(parent, nnx.List) else getattr(parent, k)
    last = keys[-1]
    if isinstance(parent, nnx.List):
        parent[int(last)] = new
    else:
        if not hasattr(parent, last):
            raise ValueError(f"path {path!r} does not exist in {type(model).__name__}")
        setattr(parent, last, new)


def insert(
    model: nnx.Module,
    pattern: str | None,
    make: Callable[[str, nnx.Module], nnx.Module],
    *,
    predicate: Predicate | None = None,
    regex: bool = False,
) -> list[str]:
    """Replace every matching module ``m`` at path ``p`` by ``make(p, m)``, deepest first
    (so a match inside another match is wrapped before its ancestor). Returns the paths."""
    found = find_modules(model, pattern, predicate=predicate, regex=regex)
    for path, module in sorted(found, key=lambda pm: -pm[0].count("/")):
        replace_module(model, path, make(path, module))
    return [p for p, _ in found]


def _check_rank(rank) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")


def _require_kernel(path: str, module: nnx.Module, pattern) -> None:
    if not isinstance(getattr(module, "kernel", None), nnx.Variable):
        raise ValueError(
            f"pattern {pattern!r} matched {path!r}, a {type(module).__name__} without a "
            "`kernel`; narrow the pattern to linear/einsum layers"
        )


def add_lora(
    model: nnx.Module,
    pattern: str | None,
    *,
    rank: int,
    alpha: float | None = None,
    rngs: nnx.Rngs,
    predicate: Predicate | None = None,
    regex: bool = False,
    **lora_kwargs,
) -> list[str]:
    """Wrap every matching kernel module in a :class:`~modjax.layers.lora.LoRA`.

    A LoRA of rank R on a ``[D, F]`` kernel adds ``R * (D + F)`` trainable parameters.
    """
    _check_rank(rank)

    def make(path, m):
        _require_kernel(path, m, pattern)
        return LoRA(m, rank, alpha=alpha, rngs=rngs, **lora_kwargs)

    return insert(model, pattern, make, predicate=predicate, regex=regex)


def _width(path: str, module: nnx.Module, side: str = "out") -> int:
    names = ("d_model", "out_features", "features") if side == "out" else ("d_model", "in_features")
    for name in names:
        v = getattr(module, name, None)
        if isinstance(v, int):
            return v
    kernel = getattr(module, "kernel", None)
    if isinstance(kernel, nnx.Variable) and kernel[...].ndim == 2:
        return kernel[...].shape[-1 if side == "out" else 0]
    raise ValueError(f"cannot infer d_model of {path!r} ({type(module).__name__}); pass d_model")


def add_adapter(
    model: nnx.Module,
    pattern: str | None,
    *,
    bottleneck_dim: int,
    placement: str = "sequential",
    d_model: int | None = None,
    activation: str = "relu",
    scale: float = 1.0,
    rngs: nnx.Rngs,
    predicate: Predicate | None = None,
    regex: bool = False,
) -> list[str]:
    """Put a bottleneck adapter after (``placement="sequential"``) or beside
    (``"parallel"``) every matching sublayer. Houlsby = sequential after attention and
    FFN sublayers, Pfeiffer = sequential after FFN sublayers only (two calls, or one
    pattern matching both). An adapter adds ``2 * D * R + R + D`` parameters.

    ``d_model`` defaults to the sublayer's ``d_model`` / ``out_features`` / kernel width;
    a parallel adapter beside a width-changing linear ``[D_in, D_out]`` reads D_in and
    writes D_out (``D_in * R + R + R * D_out + D_out`` parameters).
    """
    if placement not in ("sequential", "parallel"):
        raise ValueError(f"placement must be 'sequential' or 'parallel', got {placement!r}")
    adapter_lib.check_activation(activation)

    def make(path, m):
        d = d_model if d_model is not None else _width(path, m)
        residual = placement == "sequential"
        d_in = d if residual or d_model is not None else _width(path, m, "in")
        ad = Adapter(
            d_in, bottleneck_dim, activation=activation, residual=residual,
            out_features=d, scale=scale, rngs=rngs,
        )  # fmt: skip
        return SequentialAdapter(m, ad) if residual else ParallelAdapter(m, ad)

    return insert(model, pattern, make, predicate=predicate, regex=regex)


def add_ia3(
    model: nnx.Module,
    pattern: str | None,
    *,
    predicate: Predicate | None = None,
    regex: bool = False,
) -> list[str]:
    """Rescale the output of every matching kernel module by an (IA)^3 vector of its
    output width (``F`` parameters each, initialised to ones)."""

    def make(path, m):
        _require_kernel(path, m, pattern)
        return IA3Scaled(m)

    return insert(model, pattern, make, predicate=predicate, regex=regex)


def add_prompt(
    model: nnx.Module,
    pattern: str | None,
    *,
    prompt_length: int,
    d_model: int | None = None,
    rngs: nnx.Rngs,
    predicate: Predicate | None = None,
    regex: bool = False,
) -> list[str]:
    """Wrap the matching embedding module(s) so that their output starts with a learned
    prompt of ``prompt_length`` tokens (``P * D`` parameters). The model must extend its
    attention mask by P (``PromptTuning.extend_mask``)."""

    def make(path, m):
        d = d_model if d_model is not None else _width(path, m)
        return PromptedEmbed(m, PromptTuning(prompt_length, d, rngs=rngs))

    return insert(model, pattern, make, predicate=predicate, regex=regex)


def add_prefix(
    model: nnx.Module,
    pattern: str | None,
    *,
    prefix_length: int,
    num_heads: int | None = None,
    head_dim: int | None = None,
    rngs: nnx.Rngs,
    predicate: Predicate | None = None,
    regex: bool = False,
) -> list[str]:
    """Give every matching attention module learned prefix keys/values (Li & Liang 2021).

    Protocol: an attention module that supports prefix tuning has an attribute
    ``prefix = None`` and, when it is set, calls
    ``keys, values, mask = self.prefix(keys, values, mask)`` before attending. This sets
    ``prefix`` to a :class:`~modjax.layers.prompt.PrefixTuning` (``2 * P * H * Dh``
    parameters); ``num_heads`` / ``head_dim`` default to the module's attributes.
    """

    def make(path, m):
        if not hasattr(m, "prefix"):
            raise ValueError(
                f"pattern {pattern!r} matched {path!r}, a {type(m).__name__} without a "
                "`prefix` attribute: it does not support prefix tuning"
            )
        h = num_heads if num_heads is not None else getattr(m, "num_heads", None)
        d = head_dim if head_dim is not None else getattr(m, "head_dim", None)
        if not isinstance(h, int) or not isinstance(d, int):
            raise ValueError(f"cannot infer num_heads/head_dim of {path!r}; pass them")
        # `prefix = None` is static in NNX: mark the new value as data explicitly
        m.prefix = nnx.data(PrefixTuning(prefix_length, h, d, rngs=rngs))
        return m

    return insert(model, pattern, make, predicate=predicate, regex=regex)


def saliency_scores(
    model: nnx.Module,
    loss_fn: Callable[[nnx.Module], Array],
    pattern: str | None,
    *,
    predicate: Predicate | None = None,
    regex: bool = False,
) -> dict[str, Array]:
    """SNIP connection sensitivity ``|w * dL/dw|`` of the kernels of matching modules
    (Lee et al. 2019), to pass as ``scores`` to :func:`add_sparse_delta`.

    Args:
      loss_fn: ``loss_fn(model) -> scalar`` (e.g. the loss on a few batches).
    Returns:
      ``{path: [*kernel.shape]}``.
    """
    found = find_modules(model, pattern, predicate=predicate, regex=regex)
    for path, m in found:
        _require_kernel(path, m, pattern)
    grads = nnx.grad(loss_fn)(model)
    flat = {_path_str(k): v[...] for k, v in nnx.to_flat_state(grads)}
    return {
        p: jnp.abs(m.kernel[...].astype(jnp.float32) * flat[f"{p}/kernel"].astype(jnp.float32))
        for p, m in found
    }


def add_sparse_delta(
    model: nnx.Module,
    pattern: str | None,
    *,
    density: float,
    scores: dict[str, Array] | None = None,
    predicate: Predicate | None = None,
    regex: bool = False,
) -> list[str]:
    """Give every matching kernel module a sparse trainable delta on the
    ``round(density * size)`` kernel entries of highest score.

    Args:
      scores: ``path -> [*kernel.shape]`` scores (e.g. ``|w * grad|`` from
        :func:`modjax.computation.sparse.saliency_mask`'s criterion, or ``|delta|`` of a
        dense fine-tuning run); a missing path falls back to the kernel magnitude.
    """
    sparse_lib.num_kept(1, density)
    scores = dict(scores or {})

    def make(path, m):
        _require_kernel(path, m, pattern)
        s = scores.pop(path, None)
        kernel = m.kernel[...]
        s = jnp.abs(kernel) if s is None else jnp.asarray(s)
        if s.shape != kernel.shape:
            raise ValueError(f"scores[{path!r}] must have shape {kernel.shape}, got {s.shape}")
        return SparseDelta(m, np.asarray(sparse_lib.top_k_mask(s, density)))

    paths = insert(model, pattern, make, predicate=predicate, regex=regex)
    if scores:
        raise ValueError(f"scores given for paths that were not matched: {sorted(scores)}")
    return paths


def add_hyper_lora(
    model: nnx.Module,
    pattern: str | None,
    *,
    rank: int,
    num_tasks: int,
    task_dim: int = 16,
    hidden_dim: int = 32,
    alpha: float | None = None,
    rngs: nnx.Rngs,
    predicate: Predicate | None = None,
    regex: bool = False,
) -> list[str]:
    """Wrap every matching linear in a :class:`~modjax.layers.hypernet.HyperLoRA`."""
    _check_rank(rank)

    def make(path, m):
        _require_kernel(path, m, pattern)
        return HyperLoRA(
            m, rank, num_tasks=num_tasks, task_dim=task_dim, hidden_dim=hidden_dim,
            alpha=alpha, rngs=rngs,
        )  # fmt: skip

    return insert(model, pattern, make, predicate=predicate, regex=regex)


def _size(state) -> int:
    return int(sum(np.prod(v[...].shape) for _, v in nnx.to_flat_state(state)))


def count_params(model: nnx.Module, trainable=TRAINABLE) -> ParamCount:
    """``ParamCount(trainable, total)``: entries of ``trainable``-filtered Variables and of
    all ``nnx.Param`` (module params included)."""
    return ParamCount(_size(nnx.state(model, trainable)), _size(nnx.state(model, nnx.Param)))


def param_labels(model: nnx.Module, trainable=TRAINABLE) -> dict:
    """A nested dict of ``"trainable"`` / ``"frozen"``, the structure of
    ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``: labels for ``optax.multi_transform``
    (e.g. ``{"trainable": adam, "frozen": optax.set_to_zero()}``)."""
    t = nnx.state(model, nnx.All(nnx.Param, trainable))
    t_paths = {k for k, _ in nnx.to_flat_state(t)}
    labels = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def walk(d, prefix):
        return {
            k: walk(v, (*prefix, k))
            if isinstance(v, dict)
            else ("trainable" if (*prefix, k) in t_paths else "frozen")
            for k, v in d.items()
        }

    return walk(labels, ())


def merge_and_unload(model: nnx.Module) -> list[str]:
    """Fold every LoRA, sparse delta and (IA)^3 wrapper into its base kernel and put the
    base back in its place (the model then has its original architecture and computes
    the same function). Other wrappers (adapters, prompts, hypernetworks) cannot be
    merged and stay. Returns the unloaded paths."""
    done = []
    found = [
        (p, m) for p, m in named_modules(model) if isinstance(m, LoRA | SparseDelta | IA3Scaled)
    ]
    for path, m in sorted(found, key=lambda pm: -pm[0].count("/")):
        if isinstance(m, LoRA):
            if not m.merged:
                m.merge()
            base = m.base
        else:
            base = m.merge()
        replace_module(model, path, base)
        done.append(path)
    return done


def unload(model: nnx.Module) -> list[str]:
    """Remove every inserted wrapper (unmerging merged LoRAs), restoring the base model
    exactly. Returns the unloaded paths."""
    found = [(p, m) for p, m in named_modules(model) if isinstance(m, WRAPPERS)]
    for path, m in sorted(found, key=lambda pm: -pm[0].count("/")):
        if isinstance(m, LoRA) and m.merged:
            m.unmerge()
        replace_module(model, path, m.base)
    return [p for p, _ in found]


def _flat_module_state(model: nnx.Module) -> dict[str, nnx.Variable]:
    return {_path_str(k): v for k, v in nnx.to_flat_state(nnx.state(model, MODULE_STATE))}


def save_module_params(model: nnx.Module, path: str | os.PathLike) -> int:
    """Save the module parameters and module state (not the base model) to an ``.npz``.

    The write is atomic: a temporary file in the same folder renamed over ``path``.
    Returns the number of arrays saved. Non-numpy dtypes (bfloat16) are stored as raw
    unsigned ints of their width and restored on load.
    """
    flat = _flat_module_state(model)
    if not flat:
        raise ValueError(f"{type(model).__name__} has no module parameters to save")
    arrays, dtypes = {}, {}
    for key, var in flat.items():
        a = np.asarray(jax.device_get(var[...]))
        dtypes[key] = jnp.dtype(a.dtype).name
        if a.dtype.kind == "V" or a.dtype.name not in np.sctypeDict:
            a = a.view(f"u{a.dtype.itemsize}")
        arrays[key] = a
    arrays["__dtypes__"] = np.frombuffer(json.dumps(dtypes).encode(), dtype=np.uint8)
    atomic_save_npz(path, **arrays)
    return len(flat)


def load_module_params(model: nnx.Module, path: str | os.PathLike) -> None:
    """Load a file of :func:`save_module_params` into ``model`` (after the same surgery);
    the key sets, shapes and dtypes must agree exactly, else a ValueError names the
    difference."""
    flat = _flat_module_state(model)
    with np.load(os.fspath(path)) as data:
        dtypes = json.loads(bytes(data["__dtypes__"]).decode())
        loaded = {k: data[k] for k in data.files if k != "__dtypes__"}
    missing, unexpected = sorted(set(flat) - set(loaded)), sorted(set(loaded) - set(flat))
    if missing or unexpected:
        raise ValueError(
            f"module parameters in {os.fspath(path)!r} do not fit the model: "
            f"missing {missing[:8]}, unexpected {unexpected[:8]} (same surgery?)"
        )
    for key, var in flat.items():
        a = loaded[key]
        dt = jnp.dtype(dtypes[key])
        a = a.view(dt) if a.dtype != dt else a
        if a.shape != var[...].shape:
            raise ValueError(f"{key!r}: file has shape {a.shape}, model has {var[...].shape}")
        # a silent cast would change the model's dtype (or round the file's values)
        if dt != var[...].dtype:
            raise ValueError(f"{key!r}: file has dtype {dt.name}, model has {var[...].dtype}")
        flat[key] = var.replace(jnp.asarray(a, dtype=dt))
    state = nnx.to_flat_state(nnx.state(model, MODULE_STATE))
    new = [(k, flat[_path_str(k)]) for k, _ in state]
    nnx.update(model, nnx.from_flat_state(new))


__all__ = [
    "FROZEN",
    "MODULE_STATE",
    "TRAINABLE",
    "WRAPPERS",
    "ParamCount",
    "add_adapter",
    "add_hyper_lora",
    "add_ia3",
    "add_lora",
    "add_prefix",
    "add_prompt",
    "add_sparse_delta",
    "count_params",
    "find_modules",
    "glob_to_regex",
    "insert",
    "load_module_params",
    "merge_and_unload",
    "named_modules",
    "param_labels",
    "replace_module",
    "saliency_scores",
    "save_module_params",
    "unload",
]
