"""Commands run as a user whom file permissions bind (the tests run as root in CI, whom they do not), and files that
such a user may not read or write."""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

NOBODY = 65534   # uid and gid of nobody / nogroup
SETPRIV_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
# root without capabilities: permission checks then apply to it as to any user, for files it does not own
SETPRIV_NO_CAPABILITIES = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]
# what the commands need: their imports, and starting this Python again (serve-images' decoding workers)
PROBE = "import click, faiss, torch, subprocess, sys; subprocess.run([sys.executable, '-c', ''], check=True)"


@functools.cache
def _prefix() -> tuple[tuple[str, ...], str]:
    """-> (prefix, why it cannot be had: '' when it can)."""
    if os.geteuid() != 0:
        return (), ""                                  # already a user whom permissions bind
    if shutil.which("setpriv") is None:
        return (), "setpriv (util-linux) is not installed: cannot run a command as an unprivileged user"
    env = {**os.environ, "HOME": "/"}
    for prefix in (SETPRIV_NOBODY, SETPRIV_NO_CAPABILITIES):
        done = subprocess.run([*prefix, sys.executable, "-c", PROBE], capture_output=True, text=True, env=env,
                              cwd="/", timeout=300)
        if done.returncode == 0:
            return tuple(prefix), ""
    return (), f"setpriv cannot run this Python without privileges here: {done.stderr.strip()[-300:]}"


def unprivileged(cmd: list[str]) -> list[str]:
    """cmd run by a user whom file permissions bind: unchanged when the tests run unprivileged; as root, as nobody
    (uid 65534) where this interpreter is readable by nobody, else as root without capabilities (this machine's
    Python may live under /root). Skips the test, with the reason, where neither can be had."""
    prefix, why = _prefix()
    if why:
        pytest.skip(why)
    return [*prefix, *cmd]


def as_nobody() -> bool:
    """Whether unprivileged() runs commands as nobody (whom the tests' own files do not belong to)."""
    return _prefix()[0] == tuple(SETPRIV_NOBODY)


def someone_elses(path: Path, mode: int) -> Path:
    """Give path (a file, or a folder and all it holds) to another user (nobody, when the tests run as root) with
    mode for files, and for folders mode plus the search bit wherever it lets read, so that mode's bits are all the
    unprivileged user has: 0o444 read-only, 0 nothing."""
    folder_mode = mode | (mode & 0o444) >> 2
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in reversed(paths):   # the contents before their folder (whose new mode may shut them off)
        if os.geteuid() == 0:
            os.chown(p, NOBODY, NOBODY, follow_symlinks=False)
        os.chmod(p, folder_mode if p.is_dir() else mode)
    return path


def shared_folder() -> Path:
    """A new folder everyone may read and enter (under the system's temporary folder: pytest's tmp_path is root's
    alone); the caller removes it."""
    folder = Path(tempfile.mkdtemp(prefix="unprivileged-"))
    folder.chmod(0o755)
    return folder
