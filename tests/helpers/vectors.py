"""Synthetic vectors shaped like fc7: unit length, non-negative, all pointing one way."""
from __future__ import annotations

import numpy as np


def one_way(n: int, seed: int = 0, items: int | None = None, dim: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors that all point one way (a shared direction, as random-weight fc7 does), each a seeded item's own
    small signal plus noise -> (vectors shape=(n, dim) float32, item of each shape=(n,))."""
    rng = np.random.default_rng(seed)
    items = items or n
    common = np.abs(rng.standard_normal(dim)) * 3
    spread = rng.standard_normal(dim) * np.linspace(2.0, 0.05, dim)   # a few strong shared directions
    own = rng.standard_normal((items, dim)) * 0.25
    which = np.arange(n) % items
    x = common + rng.standard_normal((n, 1)) * spread + own[which] + rng.standard_normal((n, dim)) * 0.05
    x = np.abs(x)                                                         # non-negative, as after a ReLU
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), which
