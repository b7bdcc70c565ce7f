"""The decoder worker process of retrieval.images.decode_pool: a frame in (an upload), a frame out (its crop).

Started by DecodePool as `python -m retrieval.images.decode_worker --parent PID`, a fresh interpreter that imports
only Pillow, numpy and retrieval.images.decode. A frame: a 4-byte big-endian length, a JSON header of that length
holding "size", then size bytes of payload (no pickle: a worker that a crafted file took over cannot hand the
server code).
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any, BinaryIO

from retrieval.images.decode import Preprocessing, decode_error, decode_for_model, jpeg_bytes
from retrieval.system import die_with_parent

PREVIEW_QUALITY = 85          # JPEG quality of previews made by the workers
FRAME_LENGTH = struct.Struct(">I")


def frame(header: dict[str, Any], size: int) -> bytes:
    """A frame's length and JSON header, for a payload of size bytes (written after it)."""
    data = json.dumps({**header, "size": size}).encode()
    return FRAME_LENGTH.pack(len(data)) + data


def _cap_memory(extra_mb: int) -> None:
    """Address space = what this process has mapped now (interpreter, Pillow, numpy) + extra_mb. Linux only."""
    import resource

    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return
    for line in status.splitlines():
        if line.startswith("VmSize:"):
            limit = int(line.split()[1]) * 1024 + (extra_mb << 20)
            _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
            return


def read_frame(stream: BinaryIO) -> tuple[dict[str, Any], bytes] | None:
    """-> (header, payload), or None at EOF (the server closed the pipe or died)."""
    head = stream.read(FRAME_LENGTH.size)
    if len(head) < FRAME_LENGTH.size:
        return None
    header = json.loads(stream.read(FRAME_LENGTH.unpack(head)[0]))
    payload = stream.read(int(header["size"]))
    if len(payload) < int(header["size"]):
        return None
    return header, payload


def _answer(header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
    try:
        prep = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in header["prep"].items()})
        decoded = decode_for_model(payload, prep, max_pixels=header["max_pixels"],
                                   max_decoded_pixels=header["max_decoded_pixels"], preview_size=header["preview_size"])
        preview = jpeg_bytes(decoded.preview, PREVIEW_QUALITY) if decoded.preview is not None else b""
        pixels = decoded.pixels.tobytes()
        return ({"ok": True, "width": decoded.width, "height": decoded.height, "sha256": decoded.sha256,
                 "pixels": list(decoded.pixels.shape)}, pixels + preview)
    except Exception as exc:  # noqa: BLE001 - every failure is this file's reason, and the worker lives on
        return {"ok": False, "reason": str(decode_error(exc))}, b""


def serve(parent_pid: int, memory_mb: int | None) -> None:
    """The worker's loop: a frame in, a frame out, until EOF on stdin."""
    die_with_parent(parent_pid)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)                       # a stray print goes to the log, not into the answers
    if memory_mb:
        _cap_memory(memory_mb)
    stdin = sys.stdin.buffer

    def send(header: dict[str, Any], body: bytes) -> None:
        out.write(frame(header, len(body)))
        out.write(body)
        out.flush()

    send({"ready": True, "pid": os.getpid()}, b"")
    while (request := read_frame(stdin)) is not None:
        header, body = _answer(*request)
        del request                     # the upload is not kept while the worker waits for the next one
        send(header, body)
        del header, body


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="An image decoder worker (started by DecodePool; speaks frames on stdin/stdout).")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--memory-mb", type=int, default=None)
    args = parser.parse_args()
    try:
        serve(args.parent, args.memory_mb)
    except (BrokenPipeError, KeyboardInterrupt):
        pass
