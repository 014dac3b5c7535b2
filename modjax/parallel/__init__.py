"""Expert parallelism (the one place that uses ``jax.shard_map``) and layout printing."""

from modjax.parallel.expert_parallel import (
    OVERFLOW_POLICIES,
    ExpertFn,
    ExpertParallelStats,
    expert_parallel_apply,
    expert_parallel_reference,
    send_buffer_size,
    token_axes,
    use_expert_parallel,
)
from modjax.parallel.experts import (
    grouped_matmul,
    grouped_matmul_reference,
    make_ffn_expert_fn,
    make_lora_expert_fn,
)

__all__ = [
    "OVERFLOW_POLICIES",
    "ExpertFn",
    "ExpertParallelStats",
    "expert_parallel_apply",
    "expert_parallel_reference",
    "grouped_matmul",
    "grouped_matmul_reference",
    "make_ffn_expert_fn",
    "make_lora_expert_fn",
    "send_buffer_size",
    "token_axes",
    "use_expert_parallel",
]
