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
