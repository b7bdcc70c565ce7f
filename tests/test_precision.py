"""retrieval.reports.precision: precision@k of an evaluation as an inline SVG chart."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np

from retrieval.learning.metrics import evaluate_vectors
from retrieval.reports.precision import precision_at_k_svg


def test_precision_chart_svg_is_well_formed():
    rng = np.random.default_rng(0)
    vectors = np.concatenate([rng.normal(0, 1, (4, 8)), rng.normal(5, 1, (4, 8))]).astype(np.float32)   # two clusters
    svg = precision_at_k_svg(evaluate_vectors(vectors, ["a"] * 4 + ["b"] * 4, [1, 3], probe=False))
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg") and "P@1" in svg and "P@3" in svg and "chance" in svg
