"""Facts about the machine and the file system that every part needs: usable cores, a GPU or not, and file names shown
as text; how a process loads torch (with the garbage collector paused) and what a serving process leaves unloaded."""
from __future__ import annotations

import ctypes
import gc
import glob
import importlib.abc
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

PR_SET_PDEATHSIG = 1   # <linux/prctl.h>
GPU_DEVICE_FILES = "/dev/nvidia[0-9]*"   # one per NVIDIA GPU this process can open (nvidiactl, nvidia-uvm do not match)


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity where the OS has one (Linux), else every core (macOS)."""
    if hasattr(os, "process_cpu_count"):          # Python 3.13+: affinity-aware and portable
        return max(1, os.process_cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a block that makes many lasting objects and few cycles (importing
    torch and torchvision, loading a network), then back on, with the objects made so far frozen: later collections
    leave them out, and forked processes do not copy their pages by touching them.

    Importing torch and torchvision makes about a million objects, and the collector, triggered by allocations,
    goes over them again and again: with it paused the import takes 3.2 s instead of 3.9 s on the 2-core VM
    (medians of 8, interleaved)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def leave_out_triton() -> None:
    """Make `import triton` fail in this process and the children it forks, unless it was imported already.

    torchvision imports torch._dynamo (torchvision.ops.roi_align), which loads Triton when it is installed, for
    the GPU kernels torch.compile writes. A process that never compiles (serve-images) would hold libtriton.so
    and its modules for nothing: 74 MB of a serve-images worker's resident memory (1,270 -> 1,196 MB, 68 of
    them file-backed). Torch treats Triton as absent, as on machines without it. Call before torch is imported."""
    sys.modules.setdefault("triton", None)   # None in sys.modules: `import triton` raises ImportError


def gpu_present() -> bool:
    """Whether this process can see an NVIDIA GPU, without importing torch: a few file lookups.

    Looks for the GPUs' device files, which CUDA opens and a container is given only for its own GPUs (not
    /proc/driver/nvidia/gpus, which the host's kernel shows also to a container given no GPU). CUDA_VISIBLE_DEVICES
    set to "" or starting with -1 hides them all, as CUDA reads it. A guess for defaults, not a promise that
    CUDA works: torch.cuda.is_available() decides where the network runs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.split(",")[0].strip() in ("", "-1"):
        return False
    return bool(glob.glob(GPU_DEVICE_FILES))


def display_name(name: str) -> str:
    """A file or folder name as printable text: bytes that are not UTF-8 (kept by Python as surrogate escapes)
    are shown as \\xNN, so logs, JSON, pages and terminals never fail on them."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# control characters (C0, DEL, C1) as escapes: a name holding a newline would split a line of a table, and one holding
# an escape sequence (ESC [ ...) would drive the terminal it is printed on
_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))} | {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}


# bidirectional controls (marks, embeddings, overrides, isolates) as escapes: a folder named "\u202eevil" showed as
# "3 live" beside its count, and "report\u202efdp.jpg" would show as "reportgpj.pdf"
_BIDI_ESCAPES = {c: f"\\u{c:04x}" for c in (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))}


def shown_name(name: str) -> str:
    """display_name, with bidirectional controls escaped too (\\u202e): a name as the pages show it, never reordering
    the text around it. (The JSON answers keep them: a program gets the name as it is.)"""
    return display_name(name).translate(_BIDI_ESCAPES)


def terminal_name(name: str) -> str:
    """shown_name, with control characters escaped too (\\n, \\x1b): a name as a line of text output shows it."""
    return display_name(name).translate(_CONTROL_ESCAPES | _BIDI_ESCAPES)


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


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold back SIGINT in this thread for the block; a Ctrl-C that came meanwhile arrives right after it.

    A process forked in the block starts with SIGINT held, so a Ctrl-C at that moment waits until the child has
    said what one means to it (ignore_interrupts) instead of interrupting its start."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


class _InterruptsHeldWhileLoading(importlib.abc.MetaPathFinder):
    """Finds nothing itself: gives the modules named the spec the other finders give, their loading wrapped in
    interrupts_held."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path, target=None):  # noqa: ANN001, ANN201 - importlib's protocol
        if fullname not in self.names:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                load = spec.loader.exec_module

                def exec_module(module) -> None:  # noqa: ANN001
                    with interrupts_held():
                        load(module)
                spec.loader.exec_module = exec_module   # this spec's loader only: one per module file
                return spec
            if spec is not None:
                return spec
        return None


def hold_interrupts_while_importing(*names: str) -> None:
    """From now on in this process, a Ctrl-C that comes while one of the top-level modules named is imported waits
    until the import has finished, then interrupts as usual (KeyboardInterrupt after the import statement).

    torch's import runs C++ that calls back into Python; a KeyboardInterrupt raised inside one of those calls
    cannot unwind through the C++ and the process aborts ("terminate called after throwing an instance of
    'pybind11::error_already_set'", SIGABRT, a core dump) instead of exiting 130: seen when Ctrl-C landed about
    0.7 s after index-images' workers started. Holding it costs the user at most the import's time (3 s here)."""
    if not any(isinstance(f, _InterruptsHeldWhileLoading) for f in sys.meta_path):
        sys.meta_path.insert(0, _InterruptsHeldWhileLoading(frozenset(names)))


def ignore_interrupts() -> None:
    """In a helper process whose parent handles Ctrl-C (and stops it): SIGINT ignored, a held one dropped.

    A terminal's Ctrl-C reaches the whole process group; a helper interrupted in the middle of a reply to its
    parent would leave the parent waiting for the rest of it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # not the parent command's (an interrupt): stopped, it stops
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:   # likewise a hang-up (ignored under nohup: still)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextmanager
def time_limit(seconds: float | None, error: Callable[[], BaseException]) -> Iterator[None]:
    """Raise error() in the block once it has run for seconds (SIGALRM; a blocking read is interrupted too).

    Only on a process's main thread, where Python runs signal handlers; elsewhere, or with seconds None, the
    block runs unlimited, and the caller needs another bound (a worker process that can be killed)."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(_signum: int, _frame: object) -> None:
        raise error()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def duration_words(seconds: float) -> str:
    """A time left, as a person reads it: "40 s", "12 min", "3.5 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


def progress_bar(show: bool, desc: str, total: int, *, unit: str = "img", leave: bool = False):  # noqa: ANN201 - tqdm
    """A tqdm bar on stderr when show and stderr is a terminal (a log or a pipe gets no bar lines); silent otherwise.
    leave: the finished bar stays on screen (index-images' run), else it is wiped (a step of a longer command)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=leave,
                disable=not (show and sys.stderr.isatty()))


@contextmanager
def transient_status(show: bool) -> Iterator[Callable[[str], None]]:
    """-> a callback that shows its latest line on stderr's terminal (in place of the one before), wiped on the way
    out: for the seconds of work after a progress bar (a FAISS index built, its recall measured), which were silent.
    Silent where show is False, stderr is no terminal, or the terminal cannot erase a line (TERM=dumb: an editor's
    shell buffer, which printed the escape codes)."""
    import shutil

    shown = show and sys.stderr.isatty() and os.environ.get("TERM") != "dumb"

    def say(line: str) -> None:
        if shown:
            width = shutil.get_terminal_size().columns - 2   # one row: \r and erase-line put it back in place
            sys.stderr.write("\r\033[K" + (line + "...")[:max(width, 10)])
            sys.stderr.flush()

    try:
        yield say
    finally:
        if shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
