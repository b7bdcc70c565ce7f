"""Facts about the machine and the file system that every part needs: usable cores, and file names shown as text."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1   # <linux/prctl.h>


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity where the OS has one (Linux), else every core (macOS)."""
    if hasattr(os, "process_cpu_count"):          # Python 3.13+: affinity-aware and portable
        return max(1, os.process_cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def display_name(name: str) -> str:
    """A file or folder name as printable text: bytes that are not UTF-8 (kept by Python as surrogate escapes)
    are shown as \\xNN, so logs, JSON, pages and terminals never fail on them."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def die_with_parent(parent_pid: int) -> None:
    """In a child process: be killed (SIGKILL) when the parent dies (Linux), and exit now if it already has.

    parent_pid is the parent's pid as the parent saw it; comparing with it (not with 1) also notices an
    adoption by a subreaper (tini, systemd). Elsewhere children notice their parent's end by other means.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def gpu_present() -> bool:
    """Whether an NVIDIA GPU is visible, without importing torch (placeholder; see the writer branch)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))
