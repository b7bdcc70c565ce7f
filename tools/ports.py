"""free_port(): a TCP port on 127.0.0.1 that nothing listens on now, for the servers the tests and benchmarks start.

A development tool: the tests (tests/helpers) and the benchmarks (benchmarks/served.py) import it; nothing in the
product does.
"""
from __future__ import annotations

import socket


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1 and that was closed again (free unless someone takes it first)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
