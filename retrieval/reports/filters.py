"""First-layer convolution filters drawn as one image grid (model-info's PNG, the training chart) and how far training moved them."""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def filter_grid(filters: Any, *, cell: int | None = None, padding: int = 1, columns: int | None = None,
                dtype: type = np.float32, background: float | None = None) -> np.ndarray:
    """Arrange conv filters as one RGB image: a grid of tiles, each filter min-max scaled on its own.

    filters: shape=(n, 3 or 1, kh, kw), a float numpy array or torch tensor (a tensor is taken as float32 on the CPU).
    cell: enlarge each filter by an integer factor, nearest neighbour, so it is about `cell` pixels wide (None: 1:1).
    columns: None: ceil(sqrt(n)). dtype: np.float32 -> values 0..1 (a constant filter 0.5); np.uint8 -> 0..255,
    rounded (a constant filter 128). background: between and around the tiles; None: white (1.0 or 255).
    -> shape=(H, W, 3) of dtype, H = rows * (kh * scale + padding) + padding (W likewise with columns).
    """
    if hasattr(filters, "detach"):                          # a torch tensor; torch is not imported here
        filters = filters.detach().float().cpu().numpy()
    w = np.asarray(filters)
    if not np.issubdtype(w.dtype, np.floating):
        w = w.astype(np.float32)
    assert w.ndim == 4 and w.shape[1] in (1, 3), f"want (n, 1|3, kh, kw) filters, got {tuple(w.shape)}"
    assert dtype in (np.float32, np.uint8), f"dtype must be np.float32 or np.uint8, not {dtype}"
    top = 255.0 if dtype == np.uint8 else 1.0
    n, c, kh, kw = w.shape
    lo = w.reshape(n, -1).min(axis=1)[:, None, None, None]
    hi = w.reshape(n, -1).max(axis=1)[:, None, None, None]
    span = hi - lo
    scaled = np.where(span > 0, (w - lo) / np.where(span > 0, span, 1.0) * top, top / 2)
    tiles = (np.rint(scaled) if dtype == np.uint8 else scaled).astype(dtype).transpose(0, 2, 3, 1)   # (n, kh, kw, c)
    if c == 1:
        tiles = np.repeat(tiles, 3, axis=3)
    scale = max(1, cell // max(kh, kw)) if cell else 1
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)                            # nearest neighbour
    th, tw = kh * scale, kw * scale
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (th + padding) + padding, cols * (tw + padding) + padding, 3),
                   top if background is None else background, dtype)
    for i in range(n):
        y, x = padding + (i // cols) * (th + padding), padding + (i % cols) * (tw + padding)
        grid[y:y + th, x:x + tw] = tiles[i]
    return grid


def filter_change(before: np.ndarray, after: np.ndarray) -> float:
    """How far training moved the filters: ||after - before|| / ||before|| over all of them."""
    return float(np.linalg.norm(after - before) / max(float(np.linalg.norm(before)), 1e-12))
