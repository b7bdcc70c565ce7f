"""Precision-aware expectations: what `--precision auto` may choose on the CPU running the tests, and a skip for
tests of bf16 on the CPU where it has no bf16 units."""
from __future__ import annotations

import pytest

from retrieval.features.precision import cpu_bf16_instructions

needs_cpu_bf16 = pytest.mark.skipif(cpu_bf16_instructions() is None,
                                    reason="this CPU has no bf16 instructions (AVX512-BF16 or AMX-BF16)")


def auto_precisions_here() -> set[str]:
    """The precisions auto may pick on this CPU: fp32, and bf16 where the CPU has bf16 units (its probe decides)."""
    return {"fp32", "bf16"} if cpu_bf16_instructions() else {"fp32"}


def same_features(a, b) -> bool:
    """Two runs' vectors of one image agree: within 1e-5 where only fp32 can run; where auto may choose bf16 (its
    start-up probe decides, so two fresh indexes of one folder can differ in precision), cosine >= 0.999, the
    agreement bf16 promises with fp32 (tests/test_feature_precision.py measures it)."""
    import numpy as np

    if "bf16" not in auto_precisions_here():
        return bool(np.allclose(a, b, atol=1e-5))
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)) >= 0.999
