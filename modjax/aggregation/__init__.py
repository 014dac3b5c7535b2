"""Aggregation functions: how the outputs, inputs, parameters or functions of several
modules combine into one (Pfeiffer et al. 2023, "Modular Deep Learning", section 5).

Pure jax: arrays and pytrees in, arrays and small NamedTuples out, no parameters.

* representation: :func:`weighted_sum`, :func:`adapter_fusion`
* parameter: :func:`weighted_average`, :func:`smear_merge`, :func:`task_vector`,
  :func:`task_arithmetic`, :func:`ties_merge`, :func:`dare`
* input: :func:`concat_prompts`, :func:`prepend_prompts`
* function: :func:`stack_apply`
"""

from modjax.aggregation.function import stack_apply
from modjax.aggregation.input import PromptConcat, concat_prompts, prepend_prompts
from modjax.aggregation.parameter import (
    check_same_structure,
    dare,
    smear_merge,
    stack_trees,
    task_arithmetic,
    task_vector,
    ties_merge,
    trim_top_magnitude,
    weighted_average,
)
from modjax.aggregation.representation import FusionOutput, adapter_fusion, weighted_sum

__all__ = [
    "FusionOutput",
    "PromptConcat",
    "adapter_fusion",
    "check_same_structure",
    "concat_prompts",
    "dare",
    "prepend_prompts",
    "smear_merge",
    "stack_apply",
    "stack_trees",
    "task_arithmetic",
    "task_vector",
    "ties_merge",
    "trim_top_magnitude",
    "weighted_average",
    "weighted_sum",
]
