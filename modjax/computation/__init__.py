"""Computation functions: what a module does to a computation (pure jax, no parameters).

Submodules: :mod:`.lora` (parameter composition), :mod:`.sparse` (sparse weight deltas),
:mod:`.ia3` (rescaling), :mod:`.adapter` (bottleneck adapters), :mod:`.prompt` (prompt
and prefix tuning), :mod:`.hypernet` (generated module parameters), :mod:`.ffn` (dense
FFN and FFN experts), :mod:`.matmul` (low-precision matmuls whose gradients stay
low-precision).
"""

from modjax.computation import adapter, ffn, hypernet, ia3, lora, matmul, prompt, sparse
from modjax.computation.adapter import bottleneck, parallel_adapter, sequential_adapter
from modjax.computation.ffn import ffn as dense_ffn
from modjax.computation.ffn import grouped_ffn, moe_ffn, moe_ffn_reference
from modjax.computation.hypernet import (
    adapter_spec,
    generate_params,
    lora_spec,
    param_count,
    task_layer_embedding,
    unflatten_params,
)
from modjax.computation.ia3 import ia3_scale, merge_ia3
from modjax.computation.lora import lora_apply, lora_delta, lora_scaling, merge_lora, unmerge_lora
from modjax.computation.prompt import (
    PrefixKV,
    attention_with_prefix,
    extend_mask,
    prepend_prefix,
    prepend_prompt,
)
from modjax.computation.sparse import (
    apply_sparse_delta,
    magnitude_mask,
    saliency_mask,
    top_k_mask,
)

__all__ = [
    "PrefixKV",
    "adapter",
    "adapter_spec",
    "apply_sparse_delta",
    "attention_with_prefix",
    "bottleneck",
    "dense_ffn",
    "extend_mask",
    "ffn",
    "generate_params",
    "grouped_ffn",
    "hypernet",
    "ia3",
    "ia3_scale",
    "lora",
    "lora_apply",
    "lora_delta",
    "lora_scaling",
    "lora_spec",
    "magnitude_mask",
    "matmul",
    "merge_ia3",
    "merge_lora",
    "moe_ffn",
    "moe_ffn_reference",
    "param_count",
    "parallel_adapter",
    "prepend_prefix",
    "prepend_prompt",
    "prompt",
    "saliency_mask",
    "sequential_adapter",
    "sparse",
    "task_layer_embedding",
    "top_k_mask",
    "unflatten_params",
    "unmerge_lora",
]
