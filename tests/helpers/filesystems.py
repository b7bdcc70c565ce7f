"""Small file systems for the tests: a tmpfs to fill (a full disk), a read-only remount or bind mount (root only:
skipped with the reason where mounting is not permitted)."""
from __future__ import annotations

import errno
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from retrieval.files import is_read_only


@contextmanager
def tmpfs(folder: Path, size: str = "40m"):
    """A small tmpfs mounted on folder for the test (unmounted after); skips when mounting is not permitted."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs to fill ({exc})")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs root): {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def remount_read_only(folder: Path) -> None:
    done = subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot remount {folder} read-only: {done.stderr.strip()}")


@contextmanager
def read_only_view(source: Path, folder: Path):
    """source seen read-only at folder (a read-only bind mount); skips when mounting is not permitted."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "--bind", "-o", "ro", str(source), str(folder)], capture_output=True, text=True,
                          timeout=30)
    if done.returncode != 0:
        pytest.skip(f"a read-only bind mount is not permitted here: {done.stderr.strip()}")
    try:
        if not is_read_only(folder):
            subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True, timeout=30)
        if not is_read_only(folder):
            pytest.skip("the bind mount is not read-only here")
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def fill(folder: Path, leave_bytes: int) -> Path:
    """A ballast file that leaves about leave_bytes free on folder's file system."""
    ballast = folder / "ballast"
    st = os.statvfs(folder)
    size = max(0, st.f_bavail * st.f_frsize - leave_bytes)
    with open(ballast, "wb") as f:
        chunk = b"\0" * 2**20
        while size > 0:
            n = min(size, len(chunk))
            try:
                f.write(chunk[:n])
                f.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
            size -= n
    return ballast
