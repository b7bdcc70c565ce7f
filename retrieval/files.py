"""Files written and read safely: the one atomic write (temporary file in the same folder, fsync, rename, fsync the
folder), and opening a regular file without ever blocking on a named pipe or a device."""
from __future__ import annotations

import errno
import os
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


def _temporary_name(path: Path) -> Path:
    # Hidden, in the same folder (a rename never crosses file systems), unique per process and thread.
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def _fsync_folder(folder: Path) -> None:
    """Make a rename in folder durable. Some file systems cannot fsync a folder: the rename is still atomic there."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path | str, *, durable: bool = True) -> Iterator[BinaryIO]:
    """Open a temporary file for writing, in binary; on a clean exit it replaces path whole.

    Readers see the old file or the new one, never a part. durable: fsync the file before the rename and the
    folder after it, so a power cut keeps one of the two. On any error (a full disk, an interrupt) the
    temporary file is removed and path is left as it was; the error propagates."""
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_folder(path.parent)


def atomic_write(path: Path | str, data: bytes | Callable[[BinaryIO], object], *, durable: bool = True) -> Path:
    """Replace path whole with data: bytes, or a function that writes to the open binary file it is given
    (torch.save, np.savez, json.dump through a text wrapper...). Returns path. See atomic_file."""
    path = Path(path)
    with atomic_file(path, durable=durable) as f:
        if callable(data):
            data(f)
        else:
            f.write(data)
    return path


class NotARegularFile(OSError):
    """The path names a named pipe, a device, a socket or a folder, where a regular file was expected."""


_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def open_regular(path: Path | str, *, buffering: int = -1) -> BinaryIO:
    """Open a regular file for reading in binary, without ever blocking on what is not one.

    The open itself cannot block (O_NONBLOCK: a named pipe with no writer, a terminal), and the check is made
    on the open descriptor, so a file replaced by a pipe after a folder scan is refused, not waited on.
    Raises NotARegularFile (an OSError whose strerror says what the path is) or the OSError of the open."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise NotARegularFile(errno.EINVAL, f"not a regular file ({kind})", os.fsdecode(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


DIGEST_WHOLE_MAX = 64 << 20   # files up to this size are hashed whole; larger ones by their first and last part


def sample_digest(path: Path | str) -> tuple[int, str]:
    """(size, sha256) of a file: of all its bytes up to DIGEST_WHOLE_MAX, else of its first and last
    DIGEST_WHOLE_MAX / 2 bytes (a truncated file changes size; a garbled header or tail changes the digest).
    Raises OSError."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= DIGEST_WHOLE_MAX:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        else:
            half = DIGEST_WHOLE_MAX // 2
            digest.update(f.read(half))
            f.seek(size - half)
            digest.update(f.read(half))
    return size, digest.hexdigest()
