"""run_on_terminal(): a command run as a person runs it, on a terminal (a pseudo-terminal of 120 x 40), its output
read while it runs (a progress bar fills more than a terminal's buffer)."""
from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios
from pathlib import Path


def run_on_terminal(cmd: list[str], cwd: Path, timeout: float = 300, env: dict | None = None) -> tuple[int, str]:
    """-> (exit status, everything it wrote to the terminal, stdout and stderr together). env: variables to set."""
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))   # rows, columns: tqdm draws to fit
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=child, stderr=child,
                            env=None if env is None else {**os.environ, **env})
    os.close(child)
    out = b""
    try:
        while True:
            try:
                chunk = os.read(parent, 65536)
            except OSError:          # the terminal is closed and drained
                break
            if not chunk:
                break
            out += chunk
        proc.wait(timeout=timeout)
    finally:
        os.close(parent)
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out.decode(errors="replace")
