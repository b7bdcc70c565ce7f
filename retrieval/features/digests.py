"""sha256 of files, torch-free; a file about to be needed can be hashed ahead, on a thread.

index-images names its network's weights by their hash (hundreds of MB: 0.2 s and more). It starts that hash
before importing torch, so the two overlap: hashlib releases the GIL on large reads, and the import is
single-threaded. file_sha256 then picks up the hash started ahead, if the file has not changed since.
"""
from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future
from pathlib import Path

from retrieval.files import open_regular

_CHUNK = 1 << 20
_ahead: dict[tuple, Future] = {}
_lock = threading.Lock()


def _stamp(path: Path) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)


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
        if stamp in _ahead:
            return
        _ahead[stamp] = future
    threading.Thread(target=run, name="sha256-ahead", daemon=True).start()


def file_sha256(path: Path) -> str:
    """The hex sha256 of the file's bytes: the one hashed ahead when the file is as it was then, else hashed now."""
    try:
        stamp = _stamp(path)
    except OSError:
        stamp = None
    with _lock:
        future = _ahead.pop(stamp, None) if stamp is not None else None
    if future is not None:
        try:
            return future.result()
        except OSError:
            pass               # read now, and let its error (if any) be the caller's
    return _sha256(path)


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
