"""retrieval.reports.filters: first-layer filters as one grid (model-info's uint8 PNG, the training chart's floats)."""
from __future__ import annotations

import numpy as np
import torch

from retrieval.reports.filters import filter_change, filter_grid


def test_float_grid_scales_each_filter_to_the_full_range():
    rng = np.random.default_rng(0)
    filters = rng.normal(size=(5, 3, 4, 4)).astype(np.float32) * np.array([1, 10, 100, 0.01, 3])[:, None, None, None]
    grid = filter_grid(filters, padding=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)          # 5 filters in 3 columns, 2 rows, 1 px gaps
    for i in range(5):
        r, c = divmod(i, 3)
        tile = grid[1 + r * 5:1 + r * 5 + 4, 1 + c * 5:1 + c * 5 + 4]
        assert tile.min() == 0.0 and tile.max() == 1.0, f"filter {i} min-max scaled on its own"
    assert (grid[0] == 1.0).all(), "white gaps"


def test_uint8_grid_rescales_each_filter_and_enlarges_nearest_neighbour():
    w = torch.zeros(5, 3, 2, 2)
    w[0] = torch.arange(12, dtype=torch.float32).reshape(3, 2, 2)      # 0..11 -> 0..255
    w[1] = -1000 * torch.arange(12, dtype=torch.float32).reshape(3, 2, 2)
    w[2] = 7.0                                                          # constant -> mid grey
    grid = filter_grid(w, cell=8, padding=1, columns=3, dtype=np.uint8)
    assert grid.dtype == np.uint8 and grid.shape == (2 * (8 + 1) + 1, 3 * (8 + 1) + 1, 3)
    tile0 = grid[1:9, 1:9]
    assert tile0.min() == 0 and tile0.max() == 255
    assert (tile0[:4, :4] == tile0[0, 0]).all()                          # each weight is a 4x4 block
    np.testing.assert_array_equal(tile0[0, 0], [0, round(4 * 255 / 11), round(8 * 255 / 11)])   # RGB = in channels
    tile1 = grid[1:9, 10:18]
    assert tile1[0, 0, 0] == 255 and tile1.min() == 0                   # rescaled on its own, sign and scale ignored
    assert (grid[1:9, 19:27] == 128).all()
    assert (grid[10:19, 19:] == 255).all()                               # unused cell stays background


def test_a_tensor_and_its_array_give_the_same_grid():
    w = torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(filter_grid(w), filter_grid(w.numpy()))
    assert filter_grid(w).dtype == np.float32
    rounded = np.rint(filter_grid(w, cell=10, padding=2, dtype=np.float32) * 255)
    assert np.abs(rounded - filter_grid(w, cell=10, padding=2, dtype=np.uint8)).max() <= 1


def test_filter_change_is_relative_to_the_filters_before():
    before = np.ones((2, 3, 2, 2), np.float32)
    assert filter_change(before, before) == 0.0
    assert abs(filter_change(before, 1.1 * before) - 0.1) < 1e-6
