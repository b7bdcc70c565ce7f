"""The network's arithmetic: which precisions a device runs well (bf16 units on this CPU?) and the start-up probe of auto."""
from __future__ import annotations

import functools
import logging
import time
from typing import Callable

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")   # Linux's /proc/cpuinfo names for the instructions oneDNN uses
PROBE_RUNS = 3              # timed forward passes of each precision, alternating, after one warm-up each
PROBE_MARGIN = 0.85         # bf16 is chosen when its time is under this share of fp32's: a clear win, not noise


@functools.lru_cache(maxsize=1)
def cpu_bf16_instructions() -> str | None:
    """The CPU's bf16 instructions ("amx_bf16" or "avx512_bf16"), or None (none, or not Linux: unknown).

    Without them PyTorch still runs bf16 on AVX-512, emulated, and slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return next((flag for flag in reversed(CPU_BF16_FLAGS) if flag in flags), None)


def bf16_faster(fp32: Callable[[], object], bf16: Callable[[], object], *, runs: int = PROBE_RUNS) -> tuple[bool, dict]:
    """Time fp32() and bf16() (one forward pass each), alternating; -> (bf16 clearly faster, {"fp32_ms", "bf16_ms"}).

    One warm-up each first (oneDNN builds its kernels on the first call); the fastest of runs each: on a shared
    machine other processes only ever add time, so the minimum is the least disturbed."""
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for i in range(runs + 1):
        for name, call in (("fp32", fp32), ("bf16", bf16)):
            started = time.perf_counter()
            call()
            if i:
                times[name].append(time.perf_counter() - started)
    ms = {f"{name}_ms": round(min(t) * 1000.0, 2) for name, t in times.items()}
    return ms["bf16_ms"] < PROBE_MARGIN * ms["fp32_ms"], ms
