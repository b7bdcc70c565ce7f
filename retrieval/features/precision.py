"""The network's arithmetic: which precisions a device runs well (bf16 units on this CPU?), the start-up probe of
auto, and the probe's verdict remembered per machine."""
from __future__ import annotations

import datetime
import functools
import json
import logging
import time
from pathlib import Path
from typing import Callable

from retrieval.files import atomic_write

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")   # Linux's /proc/cpuinfo names for the instructions oneDNN uses
PROBE_RUNS = 3              # timed forward passes of each precision, alternating, after one warm-up each
PROBE_MARGIN = 0.85         # bf16 is chosen when its time is under this share of fp32's: a clear win, not noise
APP_NAME = "cnn-image-retrieval"


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ({} where there is none: not Linux)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break
                name, _, value = line.partition(":")
                fields[name.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_bf16_instructions() -> str | None:
    """The CPU's bf16 instructions ("amx_bf16" or "avx512_bf16"), or None (none, or not Linux: unknown).

    Without them PyTorch still runs bf16 on AVX-512, emulated, and slower than fp32."""
    flags = _cpuinfo().get("flags", "").split()
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


def probe_cache_file() -> Path:
    """Where auto's verdicts are remembered: the user's cache folder (XDG_CACHE_HOME, ~/.cache on Linux)."""
    import platformdirs   # only where a probe runs: index creation on a CPU with bf16 units

    return Path(platformdirs.user_cache_dir(APP_NAME)) / "precision-probe.json"


def probe_key(network: str, torch_version: str, threads: int) -> str:
    """What a verdict holds for: this CPU (model name and bf16 instructions), this torch, this many threads, and
    this network (model/layer/views)."""
    cpu = _cpuinfo().get("model name", "unknown CPU")
    return f"{cpu} | {cpu_bf16_instructions()} | torch {torch_version} | {threads} threads | {network}"


def _remembered() -> dict:
    try:
        entries = json.loads(probe_cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):   # none yet, unreadable or damaged: probe again (and rewrite it)
        return {}
    return entries if isinstance(entries, dict) else {}


def remembered_bf16(key: str) -> dict | None:
    """An earlier probe's timings ({"fp32_ms", "bf16_ms", "probed"}) when it found bf16 clearly faster here, else None.

    Only that verdict is kept: bf16 winning by the margin is the hardware's doing, while fp32 winning may be a
    busy moment, so a probe that chose fp32 runs again on the next new index."""
    entry = _remembered().get(key)
    try:
        return entry if entry["bf16_ms"] < PROBE_MARGIN * entry["fp32_ms"] else None
    except (TypeError, KeyError):
        return None


def remember_bf16(key: str, ms: dict) -> None:
    """Keep a probe that chose bf16 for the next runs on this machine. Best effort: a read-only or full cache
    folder only means the next run probes again."""
    entries = _remembered()
    entries[key] = {**ms, "probed": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        probe_cache_file().parent.mkdir(parents=True, exist_ok=True)
        atomic_write(probe_cache_file(), json.dumps(entries, indent=1).encode(), durable=False)
    except OSError as e:
        log.debug("could not remember the precision probe in %s: %s", probe_cache_file(), e)
