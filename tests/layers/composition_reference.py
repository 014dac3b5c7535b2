"""Shared by the Mixture and block tests: small linear modules and their numpy twin."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

D = 4


def linears(n, d_out=D, seed=0):
    return [nnx.Linear(D, d_out, rngs=nnx.Rngs(seed + i)) for i in range(n)]


def rand_x(seed=0, shape=(3, 5, D)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def np_linear(m, x):
    return np.asarray(x) @ np.asarray(m.kernel[...]) + np.asarray(m.bias[...])


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)
