"""sha256 of files, torch-free; a file about to be needed can be hashed ahead, on a thread.

index-images names its network's weights by their hash (hundreds of MB: 0.2 s and more). It starts that hash
before importing torch, so the two overlap: hashlib releases the GIL on large reads, and the import is
single-threaded. file_sha256 then picks up the hash started ahead, if the file has not changed since.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from retrieval.files import file_stamp, open_regular

_CHUNK = 1 << 20
_ahead: dict[tuple, Future] = {}
_known: dict[tuple, str] = {}   # hashes this process made, by file stamp: a check and then a load hash once
_KNOWN_MAX = 16
_lock = threading.Lock()


def _stamp(path: Path) -> tuple:
    """The file's path and retrieval.files.file_stamp: (path, device, inode, size, mtime_ns, ctime_ns)."""
    return (os.path.realpath(path), *file_stamp(path))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_ahead(path: Path | None) -> None:
    """Start hashing path on a daemon thread, for a file_sha256(path) to come. Silent when path is None or not
    a readable file: file_sha256 will then hash it (or raise) itself."""
    if path is None:
        return
    try:
        stamp = _stamp(path)
    except OSError:
        return
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(_sha256(path))
        except BaseException as exc:   # handed to whoever asks for it
            future.set_exception(exc)

    with _lock:
        if stamp in _ahead or stamp in _known:
            return
        _ahead[stamp] = future
    threading.Thread(target=run, name="sha256-ahead", daemon=True).start()


def file_sha256(path: Path) -> str:
    """The hex sha256 of the file's bytes: the one hashed ahead, or earlier in this process, when the file is as it
    was then (same device and inode, size, modification and status-change times), else hashed now."""
    try:
        stamp = _stamp(path)
    except OSError:
        stamp = None
    with _lock:
        known = _known.get(stamp) if stamp is not None else None
        future = _ahead.pop(stamp, None) if stamp is not None and known is None else None
    if known is not None:
        return known
    digest = None
    if future is not None:
        try:
            digest = future.result()
        except OSError:
            pass               # read now, and let its error (if any) be the caller's
    if digest is None:
        digest = _sha256(path)
    # Kept only for a file not modified in the last seconds: timestamps tick in milliseconds, so a file rewritten
    # twice in one tick, same size, would keep its stamp (git's "racy" entries, handled the same way).
    if stamp is not None and time.time_ns() - max(stamp[4], stamp[5]) > 2_000_000_000:
        with _lock:
            if len(_known) >= _KNOWN_MAX:
                _known.pop(next(iter(_known)))
            _known[stamp] = digest
    return digest


def files_sha256(folder: Path, paths: list[str]) -> list[str | None]:
    """The hex sha256 of each file at folder/path (the hash the catalog keeps of an image), None for a file that
    cannot be read now."""
    hashes: list[str | None] = []
    for path in paths:
        try:
            hashes.append(_sha256(Path(folder) / path))
        except OSError:
            hashes.append(None)
    return hashes
