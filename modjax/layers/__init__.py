"""modjax.layers: Flax NNX modules that own parameters and call the pure packages.

Parameters are tagged with Variable subclasses that serve as filters for freezing,
optimizer partitioning, sharding and saving: :class:`ModuleParam` (all added modules)
and one subtype per kind (:class:`LoRAParam`, :class:`AdapterParam`, ...),
:class:`RouterParam` / :class:`RouterBias` for routers and :class:`ExpertParam` for MoE
experts.

* computation functions: :class:`LoRA`, :class:`LoRALinear`, :class:`Adapter`,
  :class:`SequentialAdapter`, :class:`ParallelAdapter`, :class:`PromptTuning`,
  :class:`PromptedEmbed`, :class:`PrefixTuning`, :class:`IA3`, :class:`IA3Scaled`,
  :class:`SparseDelta`, :class:`HyperNetwork`, :class:`HyperLoRA`, :class:`FeedForward`
* routing: :class:`Router`, :class:`SkillAllocator`
* aggregation: :class:`Mixture`, :class:`MixtureOfAdapters`, and the blocks
  :class:`Stack`, :class:`Parallel`, :class:`Fuse`, :class:`Average`,
  :class:`BatchSplit`, :class:`Split`
* mixture of experts: :class:`MoE`
"""

from modjax.layers.adapter import Adapter, ParallelAdapter, SequentialAdapter
from modjax.layers.blocks import Average, BatchSplit, Fuse, Parallel, Split, Stack
from modjax.layers.ffn import FeedForward
from modjax.layers.hypernet import HyperLoRA, HyperNetwork
from modjax.layers.ia3 import IA3, IA3Scaled
from modjax.layers.lora import LoRA, LoRALinear
from modjax.layers.mixture import Composition, Mixture, MixtureOfAdapters, MixtureOutput
from modjax.layers.moe import ExpertParam, MoE, MoEOutput
from modjax.layers.params import (
    AdapterParam,
    FusionParam,
    HyperParam,
    IA3Param,
    LoRAParam,
    ModuleParam,
    ModuleState,
    PromptParam,
    SparseDeltaParam,
    SparseIndices,
)
from modjax.layers.prompt import PrefixTuning, PromptedEmbed, PromptTuning
from modjax.layers.router import Router, RouterBias, RouterOutput, RouterParam, SkillAllocator
from modjax.layers.sparse import SparseDelta

__all__ = [
    "IA3",
    "Adapter",
    "AdapterParam",
    "Average",
    "BatchSplit",
    "Composition",
    "ExpertParam",
    "FeedForward",
    "Fuse",
    "FusionParam",
    "HyperLoRA",
    "HyperNetwork",
    "HyperParam",
    "IA3Param",
    "IA3Scaled",
    "LoRA",
    "LoRALinear",
    "LoRAParam",
    "Mixture",
    "MixtureOfAdapters",
    "MixtureOutput",
    "MoE",
    "MoEOutput",
    "ModuleParam",
    "ModuleState",
    "Parallel",
    "ParallelAdapter",
    "PrefixTuning",
    "PromptParam",
    "PromptTuning",
    "PromptedEmbed",
    "Router",
    "RouterBias",
    "RouterOutput",
    "RouterParam",
    "SequentialAdapter",
    "SkillAllocator",
    "SparseDelta",
    "SparseDeltaParam",
    "SparseIndices",
    "Split",
    "Stack",
]
