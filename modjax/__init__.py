"""modjax: modular deep learning in JAX and Flax NNX.

A modular model is four independent choices (Pfeiffer et al., "Modular Deep Learning",
TMLR 2023), each a subpackage:

* :mod:`modjax.computation`: what a module does (LoRA, adapters, prompts, (IA)^3,
  sparse deltas, hypernetworks, FFN experts); pure jax functions
* :mod:`modjax.routing`: which modules are active, with what score; pure jax functions
* :mod:`modjax.aggregation`: how active modules are combined; pure jax functions
* :mod:`modjax.layers`: Flax NNX modules that own the parameters; :mod:`modjax.surgery`
  inserts, replaces, freezes and merges them inside any NNX model

``import modjax`` imports nothing heavy: import the subpackage you need, e.g.
``from modjax import routing`` or ``import modjax.layers``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
