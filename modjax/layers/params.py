"""Variable tags for module parameters: select them by type to freeze, train, shard or save.

Every trainable parameter that a computation function adds to a base model is a
:class:`ModuleParam` (a subclass of ``nnx.Param``), of one subtype per kind, so that
``nnx.state(model, ModuleParam)`` is "all added modules" and
``nnx.state(model, LoRAParam)`` is "only the LoRAs". Fixed (non-trained) module state,
such as the kept indices of a sparse delta, is a :class:`ModuleState`, which is not a ``nnx.Param``.

Example:
  >>> frozen = nnx.All(nnx.Param, nnx.Not(ModuleParam))
  >>> trainable = nnx.state(model, ModuleParam)
"""

from __future__ import annotations

from flax import nnx


class ModuleParam(nnx.Param):
    """A trainable parameter of an added module (base class of the tags below)."""


class LoRAParam(ModuleParam):
    """LoRA factors ``A [D, R]`` and ``B [R, F]``."""


class AdapterParam(ModuleParam):
    """Bottleneck adapter projections and biases."""


class PromptParam(ModuleParam):
    """Prompt embeddings ``[P, D]`` and prefix keys/values ``[P, H, Dh]``."""


class IA3Param(ModuleParam):
    """(IA)^3 rescaling vectors."""


class SparseDeltaParam(ModuleParam):
    """The (masked) weight delta of sparse fine-tuning."""


class HyperParam(ModuleParam):
    """Hypernetwork generator weights and task/layer embeddings."""


class FusionParam(ModuleParam):
    """AdapterFusion query/key/value projections ``[D, D]``."""


class ModuleState(nnx.Variable):
    """Fixed, non-trained state of an added module (saved with its parameters)."""


class SparseIndices(ModuleState):
    """The flat indices of the entries a sparse delta may change."""


__all__ = [
    "AdapterParam",
    "FusionParam",
    "HyperParam",
    "IA3Param",
    "LoRAParam",
    "ModuleParam",
    "ModuleState",
    "PromptParam",
    "SparseDeltaParam",
    "SparseIndices",
]
