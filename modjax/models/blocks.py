"""Pieces shared by the model families: RoPE attention, the residual block, the choice of
each block's FFN (dense, MoE, mixture of modules) and the collection of auxiliary outputs.

Every block returns ``(x, aux)`` with ``aux = {"aux_losses": {name: scalar},
"metrics": {name: scalar}, "expert_load": [E] or None}``; :func:`collect_aux` sums the
losses over blocks, averages the metrics and stacks the loads into ``[L_moe, E]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from modjax.layers.ffn import FeedForward, check_float_dtype
from modjax.sharding import shard_activation
from modjax.typing import Array, DType

FFN_KINDS = ("dense", "moe", "mixture")
PLACEMENTS = ("none", "all", "every", "top", "bottom")


def normal_init(stddev: float = 0.02):
    """A normal initializer of standard deviation ``stddev``."""
    return nnx.initializers.normal(stddev)


def sparse_layer_indices(num_layers: int, placement: str, every: int = 2, count: int = 1):
    """Indices of the blocks whose FFN is sparse (MoE or mixture).

    Args:
      num_layers: number of blocks.
      placement: ``"none"``, ``"all"``, ``"every"`` (blocks ``every-1, 2*every-1, ...``,
        as in GShard/Switch which make every other FFN sparse), ``"top"`` (the last
        ``count`` blocks) or ``"bottom"`` (the first ``count``).
      every: period for ``"every"``; count: number of blocks for ``"top"``/``"bottom"``.

    Returns:
      A sorted tuple of block indices.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"sparse_every must be a positive int, got {every!r}")
    if not isinstance(count, int) or not 0 <= count <= num_layers:
        raise ValueError(f"sparse_count must be an int in [0, {num_layers}], got {count!r}")
    if placement == "none":
        return ()
    if placement == "all":
        return tuple(range(num_layers))
    if placement == "every":
        return tuple(i for i in range(num_layers) if (i + 1) % every == 0)
    if placement == "top":
        return tuple(range(num_layers - count, num_layers))
    return tuple(range(count))


@dataclasses.dataclass(frozen=True)
class FFNSpec:
    """How the blocks' FFNs are built.

    Attributes:
      d_ff: hidden width F of dense FFNs (and the default expert width).
      activation: ``"swiglu"`` or ``"gelu"``.
      sparse: kind of the sparse blocks' FFN: ``"moe"`` or ``"mixture"`` (or
        ``"dense"`` for an all-dense model).
      placement, every, count: which blocks are sparse (:func:`sparse_layer_indices`).
      sparse_kwargs: keyword arguments of the sparse layer (``modjax.layers.moe.MoE``
        or ``modjax.layers.mixture``'s layer), besides the widths, dtypes and rngs.
    """

    d_ff: int
    activation: str = "swiglu"
    sparse: str = "dense"
    placement: str = "every"
    every: int = 2
    count: int = 1
    sparse_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.sparse not in FFN_KINDS:
            raise ValueError(f"ffn kind must be one of {FFN_KINDS}, got {self.sparse!r}")
        if not isinstance(self.d_ff, int) or self.d_ff < 1:
            raise ValueError(f"d_ff must be a positive int, got {self.d_ff!r}")

    def kind_of(self, index: int, num_layers: int) -> str:
        if self.sparse == "dense":
            return "dense"
        sparse = sparse_layer_indices(num_layers, self.placement, self.every, self.count)
        return self.sparse if index in sparse else "dense"


class FFNConfig:
    """Mixin of the model Configs: their FFN fields (``d_ff``, ``activation``, ``ffn``,
    ``sparse_placement``, ``sparse_every``, ``sparse_count``, ``sparse_kwargs``) as one
    :class:`FFNSpec`."""

    def ffn_spec(self) -> FFNSpec:
        return FFNSpec(
            d_ff=self.d_ff, activation=self.activation, sparse=self.ffn,
            placement=self.sparse_placement, every=self.sparse_every,
            count=self.sparse_count, sparse_kwargs=dict(self.sparse_kwargs),
        )  # fmt: skip


def _build_moe(d_model, spec: FFNSpec, dtype, param_dtype, rngs):
    from modjax.layers.moe import MoE

    kwargs = dict(spec.sparse_kwargs)
    kwargs.setdefault("d_ff", spec.d_ff)
    kwargs.setdefault("activation", spec.activation)
    return MoE(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kwargs)


def _build_mixture(d_model, spec: FFNSpec, dtype, param_dtype, rngs):
    from modjax.layers import mixture

    kwargs = dict(spec.sparse_kwargs)
    name = kwargs.pop("layer", "MixtureOfAdapters")
    layer_cls = getattr(mixture, name, None)
    if layer_cls is None or not isinstance(layer_cls, type):
        valid = sorted(n for n in getattr(mixture, "__all__", ()) if n[0].isupper())
        raise ValueError(f"mixture layer must be one of {valid}, got {name!r}")
    return layer_cls(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kwargs)


def _build_dense(d_model, spec: FFNSpec, dtype, param_dtype, rngs):
    return FeedForward(
        d_model, spec.d_ff, activation=spec.activation, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs,
    )  # fmt: skip


_FFN_BUILDERS = {"dense": _build_dense, "moe": _build_moe, "mixture": _build_mixture}


def empty_aux() -> dict[str, Any]:
    return {"aux_losses": {}, "metrics": {}, "expert_load": None}


def _normalize_ffn_output(out) -> tuple[Array, dict[str, Any]]:
    """``(y, aux)`` from a dense FFN (an array) or a sparse layer's output."""
    if isinstance(out, jax.Array):
        return out, empty_aux()
    fields = getattr(out, "_fields", None)
    if fields is not None:  # a NamedTuple: (output, aux_losses, metrics, ...)
        d = out._asdict()
        y = d.get("output", out[0])
        aux = {
            "aux_losses": dict(d.get("aux_losses") or {}),
            "metrics": dict(d.get("metrics") or {}),
            "expert_load": d.get("expert_load"),
        }
    else:
        y, extra = out
        aux = {
            "aux_losses": dict(extra.get("aux_losses") or {}),
            "metrics": dict(extra.get("metrics") or {}),
            "expert_load": extra.get("expert_load"),
        }
    if aux["expert_load"] is None:
        aux["expert_load"] = aux["metrics"].pop("expert_load", None)
    return y, aux


def collect_aux(auxes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sum aux losses over blocks, average metrics, stack expert loads to ``[L_moe, E]``."""
    losses: dict[str, Array] = {}
    metrics: dict[str, list[Array]] = {}
    loads = []
    for aux in auxes:
        for k, v in aux["aux_losses"].items():
            losses[k] = losses.get(k, 0.0) + jnp.asarray(v, jnp.float32)
        for k, v in aux["metrics"].items():
            if jnp.ndim(v) == 0:
                metrics.setdefault(k, []).append(jnp.asarray(v, jnp.float32))
        if aux.get("expert_load") is not None:
            loads.append(jnp.asarray(aux["expert_load"], jnp.float32))
    out = {
        "aux_losses": losses,
        "metrics": {k: jnp.mean(jnp.stack(v)) for k, v in metrics.items()},
    }
    if loads:
        shapes = sorted({x.shape for x in loads})
        if len(shapes) > 1:  # the aux-loss-free bias step needs one [L_moe, E] array
            raise ValueError(f"sparse blocks report expert loads of different shapes {shapes}")
        out["expert_load"] = jnp.stack(loads)
    return out


def rope(x: Array, positions: Array, base: float) -> Array:
    """Rotary position embedding (Su et al. 2021) of ``x [B, T, H, Dh]`` at ``positions
    [T]``, rotating the two halves of the head dimension."""
    half = x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[:, None] * freq[None, :]  # [T, Dh/2]
    sin, cos = jnp.sin(angle)[None, :, None, :], jnp.cos(angle)[None, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention ``[B, T, D] -> [B, T, D]`` through
    ``jax.nn.dot_product_attention``, with optional RoPE and causal masking.

    Projections are ``nnx.Linear`` (so surgery can wrap them with LoRA) with logical axes
    ("embed", "heads") and ("heads", "embed").
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int,
        *,
        causal: bool,
        use_rope: bool,
        rope_base: float = 10_000.0,
        implementation: str | None = "auto",
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if use_rope and head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.causal, self.use_rope, self.rope_base = causal, use_rope, rope_base
        self.implementation = implementation
        inner = num_heads * head_dim

        def linear(i, o, axes, std):
            return nnx.Linear(
                i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                kernel_init=normal_init(std), kernel_metadata={"logical_axes": axes}, rngs=rngs,
            )  # fmt: skip

        std = d_model**-0.5
        self.query = linear(d_model, inner, ("embed", "heads"), std)
        self.key = linear(d_model, inner, ("embed", "heads"), std)
        self.value = linear(d_model, inner, ("embed", "heads"), std)
        self.out = linear(inner, d_model, ("heads", "embed"), inner**-0.5)

    def __call__(self, x: Array) -> Array:
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q, k, v = (p(x).reshape(shape) for p in (self.query, self.key, self.value))
        if self.use_rope:
            pos = jnp.arange(t)
            q, k = rope(q, pos, self.rope_base), rope(k, pos, self.rope_base)
        q, k, v = (shard_activation(a, ("batch", "length", "heads", "head_dim")) for a in (q, k, v))
        y = attention(q, k, v, causal=self.causal, implementation=self.implementation)
        return self.out(y.reshape(b, t, -1))


ATTENTION_IMPLS = ("auto", None, "xla", "cudnn")


def _on_cuda() -> bool:
    """Whether the default backend is an NVIDIA GPU (not ROCm): where cuDNN can run."""
    if jax.default_backend() != "gpu":
        return False
    try:
        return "cuda" in jax.devices()[0].client.platform_version.lower()
    except AttributeError:  # a client without a version string: assume CUDA
        return True


def attention(q: Array, k: Array, v: Array, *, causal: bool, implementation: str | None = "auto"):
    """``jax.nn.dot_product_attention`` over ``[B, T, heads, head_dim]`` with a fast default.

    ``implementation``: ``"xla"``, ``"cudnn"`` (fused flash attention; fails where cuDNN
    does not support the shape or dtype), ``None`` (jax's own choice: XLA today) or
    ``"auto"``: cuDNN on an NVIDIA GPU when jax accepts the call (bf16 or fp16, a
    supported head dim and length, cuDNN present: it checks at trace time and raises
    otherwise), XLA in every other case. On the H200 the 12-layer LM of
    ``benchmarks/train_step.py`` steps 1.6 times faster with cuDNN (RESULTS.md).
    """
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"implementation must be one of {ATTENTION_IMPLS}, got {implementation!r}")
    if implementation == "auto":
        implementation = "xla"
        if _on_cuda() and q.dtype in (jnp.bfloat16, jnp.float16):
            try:
                return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                    implementation="cudnn")  # fmt: skip
            except (NotImplementedError, RuntimeError):  # unsupported shape, or no cuDNN
                pass
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)


def rms_norm(d_model: int, param_dtype, rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(
        d_model, epsilon=1e-6, param_dtype=param_dtype,
        scale_metadata={"logical_axes": ("norm",)}, rngs=rngs,
    )  # fmt: skip


class Block(nnx.Module):
    """Pre-norm residual block: ``x + attn(norm(x))`` (when it has attention), then
    ``x + ffn(norm(x))`` where the FFN is dense, MoE or a mixture of modules."""

    def __init__(
        self,
        d_model: int,
        ffn_kind: str,
        ffn: FFNSpec,
        *,
        attention: Attention | None,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if ffn_kind not in _FFN_BUILDERS:
            raise ValueError(f"ffn kind must be one of {sorted(_FFN_BUILDERS)}, got {ffn_kind!r}")
        self.ffn_kind = ffn_kind
        self.attention = attention
        self.attn_norm = rms_norm(d_model, param_dtype, rngs) if attention is not None else None
        self.ffn_norm = rms_norm(d_model, param_dtype, rngs)
        self.ffn = _FFN_BUILDERS[ffn_kind](d_model, ffn, dtype, param_dtype, rngs)
        self.dtype = dtype

    def __call__(
        self, x: Array, *, train: bool = False, **ffn_context
    ) -> tuple[Array, dict[str, Any]]:
        if self.attention is not None:
            x = x + self.attention(self.attn_norm(x).astype(self.dtype)).astype(x.dtype)
        h = self.ffn_norm(x).astype(self.dtype)
        if self.ffn_kind == "dense":
            y, aux = self.ffn(h), empty_aux()
        else:
            y, aux = _normalize_ffn_output(self.ffn(h, train=train, **ffn_context))
        x = x + y.astype(x.dtype)
        axes = ("batch", "length", "embed") if x.ndim == 3 else ("batch", "embed")
        return shard_activation(x, axes), aux


def build_blocks(
    d_model: int,
    spec: FFNSpec,
    num_layers: int,
    *,
    attention_fn: Callable[[], Attention] | None = None,
    dtype: DType = jnp.float32,
    param_dtype: DType = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.List:
    """``num_layers`` residual :class:`Block` s, each with a fresh ``attention_fn()``
    (None: FFN-only blocks) and the FFN kind ``spec`` gives its index."""
    blocks = []
    for i in range(num_layers):
        attention = attention_fn() if attention_fn is not None else None
        kind = spec.kind_of(i, num_layers)
        blocks.append(
            Block(
                d_model,
                kind,
                spec,
                attention=attention,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )  # fmt: skip
        )
    return nnx.List(blocks)


#: Activation checkpointing of each block (``jax.checkpoint``): what the backward pass
#: keeps from the forward. ``"none"``: everything (fastest, most memory); ``"dots"``: the
#: matmul outputs, elementwise work is recomputed; ``"full"``: only the block inputs, the
#: whole block is recomputed (least memory, ~1/3 more compute).
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def check_remat(remat: str) -> str:
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    return remat


def apply_blocks(
    blocks: Sequence[Block], x: Array, *, train: bool = False, remat: str = "none",
    **ffn_context,
) -> tuple[Array, dict[str, Any]]:  # fmt: skip
    """``x`` through ``blocks`` in order; the aux outputs collected (:func:`collect_aux`).

    ``remat``: activation checkpointing per block, a key of :data:`REMAT_POLICIES`.
    """
    policy = REMAT_POLICIES[check_remat(remat)]
    auxes = []
    for block in blocks:
        if remat == "none":
            x, aux = block(x, train=train, **ffn_context)
        else:
            x, aux = _checkpointed_call(block, x, policy, train, ffn_context)
        auxes.append(aux)
    return x, collect_aux(auxes)


def _checkpointed_call(block, x, policy, train, ffn_context):
    """``block(x)`` under ``jax.checkpoint``, functionally: the block's state (RNG counts,
    router biases) goes in and out as arrays, so it works inside any outer transform
    (the trainer differentiates ``nnx.merge``-d params with plain ``jax.grad``)."""
    graphdef, state = nnx.split(block)

    def pure(state, x):
        module = nnx.merge(graphdef, state)
        out = module(x, train=train, **ffn_context)
        return out, nnx.state(module)

    out, new_state = jax.checkpoint(pure, policy=policy)(state, x)
    nnx.update(block, new_state)
    return out


def token_embedding(vocab_size: int, d_model: int, *, dtype, param_dtype, rngs) -> nnx.Embed:
    """Token embedding ``[V, D]``, unit normal init, logical axes ("vocab", "embed")."""
    return nnx.Embed(
        vocab_size, d_model, dtype=dtype, param_dtype=param_dtype,
        embedding_init=normal_init(1.0),
        embedding_metadata={"logical_axes": ("vocab", "embed")}, rngs=rngs,
    )  # fmt: skip


def input_projection(in_width: int, d_model: int, *, dtype, param_dtype, rngs) -> nnx.Linear:
    """Linear ``[in_width] -> [D]`` with bias, fan-in normal init (patches, features)."""
    return nnx.Linear(
        in_width, d_model, dtype=dtype, param_dtype=param_dtype,
        kernel_init=normal_init(in_width**-0.5),
        kernel_metadata={"logical_axes": (None, "embed")},
        bias_metadata={"logical_axes": ("embed",)}, rngs=rngs,
    )  # fmt: skip


def classifier_head(d_model: int, num_classes: int, *, dtype, param_dtype, rngs) -> nnx.Linear:
    """Linear ``[D] -> [classes]``, zero-initialised (uniform logits at the start)."""
    return nnx.Linear(
        d_model, num_classes, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.initializers.zeros_init(),
        kernel_metadata={"logical_axes": ("embed", None)}, rngs=rngs,
    )  # fmt: skip


def resolve_dtypes(dtype, param_dtype) -> tuple[jnp.dtype, jnp.dtype]:
    return check_float_dtype("dtype", dtype), check_float_dtype("param_dtype", param_dtype)


def check_positive(**values):
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


__all__ = [
    "FFN_KINDS",
    "PLACEMENTS",
    "Attention",
    "Block",
    "FFNConfig",
    "FFNSpec",
    "apply_blocks",
    "build_blocks",
    "classifier_head",
    "collect_aux",
    "empty_aux",
    "input_projection",
    "normal_init",
    "resolve_dtypes",
    "rms_norm",
    "check_positive",
    "rope",
    "sparse_layer_indices",
    "token_embedding",
]
