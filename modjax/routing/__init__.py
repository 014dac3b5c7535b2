"""modjax.routing: pure functions (jax only) from router scores to routing decisions.

Routers (each returns a :class:`Routing` or :class:`DenseRouting`; leading axes of the
scores are groups routed independently):

* fixed / task: :func:`fixed_routing`, :func:`task_routing`
* top-k token choice with capacity and batch priority: :func:`top_k_routing`
* expert choice: :func:`expert_choice_routing`
* hash: :func:`hash_routing`
* balanced (BASE via Sinkhorn): :func:`balanced_routing`
* soft mixture and Soft MoE slots: :func:`soft_routing`, :func:`soft_moe_routing`
* Gumbel-softmax and straight-through: :func:`gumbel_softmax_routing`,
  :func:`straight_through_routing`
* Polytropon / MHR skill allocation: :func:`skill_allocation`, :func:`polytropon_routing`

Applying a decision: :func:`dispatch` / :func:`combine`. Balancing: :mod:`.losses`.
Monitoring: :func:`routing_metrics`. Granularity and level: :mod:`.granularity`.
"""

from modjax.routing.balanced import balanced_routing, sinkhorn_plan
from modjax.routing.dispatch import combine, dispatch
from modjax.routing.expert_choice import expert_choice_routing
from modjax.routing.granularity import broadcast_routing, pool_tokens
from modjax.routing.groups import map_groups, merge_groups, split_groups
from modjax.routing.gumbel import gumbel_softmax_routing, straight_through_routing
from modjax.routing.hash import hash_routing
from modjax.routing.losses import (
    assignment_counts,
    aux_free_bias_update,
    importance_loss,
    load_balancing_loss,
    load_loss,
    router_z_loss,
    sequence_balance_loss,
)
from modjax.routing.metrics import routing_metrics
from modjax.routing.polytropon import polytropon_routing, skill_allocation
from modjax.routing.soft import mixture_routing, soft_moe_routing, soft_routing
from modjax.routing.task import fixed_routing, task_routing
from modjax.routing.top_k import queue_slots, routing_from_choices, top_k_routing
from modjax.routing.types import DenseRouting, Routing

__all__ = [
    "DenseRouting",
    "Routing",
    "assignment_counts",
    "aux_free_bias_update",
    "balanced_routing",
    "broadcast_routing",
    "combine",
    "dispatch",
    "expert_choice_routing",
    "fixed_routing",
    "gumbel_softmax_routing",
    "hash_routing",
    "importance_loss",
    "load_balancing_loss",
    "load_loss",
    "map_groups",
    "merge_groups",
    "mixture_routing",
    "polytropon_routing",
    "pool_tokens",
    "queue_slots",
    "router_z_loss",
    "routing_from_choices",
    "routing_metrics",
    "sequence_balance_loss",
    "sinkhorn_plan",
    "skill_allocation",
    "soft_moe_routing",
    "soft_routing",
    "split_groups",
    "straight_through_routing",
    "task_routing",
    "top_k_routing",
]
