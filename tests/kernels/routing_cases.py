"""Group ids of the kernels' test cases: random, skewed and with empty groups."""

import numpy as np


def group_ids(kind: str, m: int, g: int, rng: np.random.Generator) -> np.ndarray:
    """``m`` group ids in ``[0, g)``: ``"random"``; ``"skewed"`` (80% to groups 0 and 1);
    ``"empty"`` (groups 1 and ``g - 1`` get no rows)."""
    ids = rng.integers(0, g, m)
    if kind == "skewed":
        ids = np.where(rng.random(m) < 0.8, rng.integers(0, 2, m), ids)
    if kind == "empty":
        ids = np.where((ids == 1) | (ids == g - 1), 0, ids)
    return ids
