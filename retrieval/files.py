"""Files written and read safely: the one atomic write (temporary file in the same folder, fsync, rename, fsync the
folder), and opening a regular file without ever blocking on a named pipe or a device."""
from __future__ import annotations

import errno
import os
import re
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator


def _temporary_name(path: Path) -> Path:
    # Hidden, in the same folder (a rename never crosses file systems), unique per process and thread.
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


_TEMPORARY = re.compile(r"\.(.+)\.\d+\.\d+\.tmp")   # _temporary_name's names; group 1: the file it replaces


def replaced_by(path: Path | str) -> Path:
    """The file an atomic write's temporary file stands for (.vectors.faiss.PID.TID.tmp -> vectors.faiss); any other
    path as it is."""
    path = Path(path)
    named = _TEMPORARY.fullmatch(path.name)
    return path.with_name(named.group(1)) if named else path


def leftover_temporaries(folder: Path | str) -> list[Path]:
    """Temporary files of atomic writes in folder that never finished (a process killed mid-write: kill -9, a lost
    machine): hidden, named as _temporary_name names them. Only a caller who knows no writer is at work in folder
    (index-images under its lock) may take them for leftovers."""
    try:
        return sorted(p for p in Path(folder).iterdir() if _TEMPORARY.fullmatch(p.name) and p.is_file())
    except OSError:
        return []


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
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc.__context__, KeyboardInterrupt) and not isinstance(exc, KeyboardInterrupt):
            # a writer whose own cleanup failed once it was interrupted (torch.save's zip writer: "unexpected
            # pos"): the Ctrl-C is what happened, and what the caller handles
            raise exc.__context__ from None
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


def file_stamp(path: Path | str) -> tuple[int, int, int, int, int]:
    """What tells a file's bytes apart without reading them: (device, inode, size, modification time, status-change
    time, nanoseconds). The status-change time moves with any rewrite, even one that puts the modification time
    back (cp -p, touch -r, rsync -t), and a new file in a reused inode has it anew. Raises OSError."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def file_kind(mode: int) -> str:
    """What a stat mode that is not a regular file's names, in words: "a named pipe", "a character device", ..."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_regular(path: Path | str, *, buffering: int = -1) -> BinaryIO:
    """Open a regular file for reading in binary, without ever blocking on what is not one.

    The open itself cannot block (O_NONBLOCK: a named pipe with no writer, a terminal), and the check is made
    on the open descriptor, so a file replaced by a pipe after a folder scan is refused, not waited on.
    Raises NotARegularFile (an OSError whose strerror says what the path is) or the OSError of the open."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(errno.EINVAL, f"not a regular file ({file_kind(mode)})", os.fsdecode(path))
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
    with open(path, "rb") as f:
        return descriptor_digest(f.fileno())


def descriptor_digest(fd: int) -> tuple[int, str]:
    """sample_digest of the open file fd (read with pread: its offset is left as it was). Raises OSError."""
    import hashlib

    digest = hashlib.sha256()
    size = os.fstat(fd).st_size
    parts = [(0, size)] if size <= DIGEST_WHOLE_MAX else [(0, DIGEST_WHOLE_MAX // 2),
                                                           (size - DIGEST_WHOLE_MAX // 2, DIGEST_WHOLE_MAX // 2)]
    for start, length in parts:
        done = 0
        while done < length and (chunk := os.pread(fd, min(1 << 20, length - done), start + done)):
            digest.update(chunk)
            done += len(chunk)
    return size, digest.hexdigest()


def private_copy(path: Path | str, folders: Iterable[Path | str | None]) -> BinaryIO | None:
    """A private copy of the regular file at path, in the first of folders that takes it (None: the temporary
    folder): a temporary file with no name (unlinked at once), so nothing else can open, truncate or rewrite it.
    -> the copy, open for reading and writing at offset 0 (closing it frees it, unless something still maps it), or
    None when no folder allowed it (read-only, missing) or had room for it with as much again to spare (a copy must
    not fill the disk under other writers). Raises the OSError of opening or reading path (FileNotFoundError...).

    What it is for: a file mapped into memory (mmap) and then truncated in place kills the process that maps it
    with SIGBUS at its next read of the lost pages; a mapping of a private copy cannot lose them."""
    import shutil
    import tempfile

    with open_regular(path) as source:
        size = os.fstat(source.fileno()).st_size
        for folder in folders:
            free = free_bytes(folder if folder is not None else tempfile.gettempdir())
            if free is not None and free < 2 * size:   # leave the disk at least as much again for its other writers
                continue
            try:
                copy = tempfile.TemporaryFile(dir=folder)   # O_TMPFILE where the file system has it: never named
            except OSError:
                continue
            try:
                source.seek(0)
                copied = 0
                while n := _copy_range(source.fileno(), copy.fileno(), copied):
                    copied += n
                if copied == 0 and size:   # copy_file_range refused: copy through user space
                    shutil.copyfileobj(source, copy, 1 << 20)
                copy.flush()
                copy.seek(0)
                return copy
            except OSError as exc:
                copy.close()
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO):
                    raise
    return None


def _copy_range(src: int, dst: int, offset: int) -> int:
    """Copy the next chunk of src from offset to the same offset of dst in the kernel; -> bytes copied, 0 at the end
    (or where the kernel cannot copy between these two files: the caller then copies through user space)."""
    try:
        return os.copy_file_range(src, dst, 1 << 30, offset, offset)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL) and offset == 0:
            return 0
        raise


# --- a full disk, a read-only folder: recognised wherever they surface, told in one line -------------------------

FULL = "full"
READ_ONLY = "read-only"

_FULL_TEXTS = ("no space left on device", "database or disk is full", "disk quota exceeded",
               "pytorchstreamwriter failed writing file", "file write failed")
_READ_ONLY_TEXTS = ("read-only file system", "attempt to write a readonly database")
# SQLite's 'disk I/O error' when it cannot make room for its 32 KB shared-memory file beside a WAL catalog: the first
# connection to a catalog on a full disk (a reader too) fails so
_FULL_SQLITE_ERRORS = ("SQLITE_IOERR_SHMSIZE",)


def disk_trouble(exc: BaseException | None) -> str | None:
    """FULL when exc (or an exception it was raised from) is a full disk: OSError ENOSPC or EDQUOT, SQLite's
    'database or disk is full' or its shared-memory file without room (as SQLAlchemy's OperationalError), torch's serialization RuntimeError or FAISS's
    writer error around one; READ_ONLY for EROFS or SQLite's 'attempt to write a readonly database'; else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return FULL
        if isinstance(exc, OSError) and exc.errno == errno.EROFS:
            return READ_ONLY
        if getattr(exc, "sqlite_errorname", None) in _FULL_SQLITE_ERRORS:
            return FULL
        if not isinstance(exc, OSError) or exc.errno is None:
            text = f"{exc} {getattr(exc, 'orig', '') or ''}".lower()
            if any(t in text for t in _FULL_TEXTS):
                return FULL
            if any(t in text for t in _READ_ONLY_TEXTS):
                return READ_ONLY
        exc = exc.__cause__ or exc.__context__ or getattr(exc, "orig", None)
    return None


def mount_of(path: Path | str) -> tuple[str, str]:
    """(source, mount point) of the file system holding path, from /proc/self/mountinfo: ("tmpfs", "/mnt/x"),
    ("/dev/sda1", "/"). The nearest existing folder above path is used; ("", "") when it cannot be told."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    path = path.resolve()
    best = ("", "")
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 2:
            continue
        point = fields[4].encode().decode("unicode_escape")   # \040 for a space
        try:
            inside = path == Path(point) or path.is_relative_to(point)
        except ValueError:
            inside = False
        if inside and len(point) >= len(best[1]):
            best = (tail[1], point)
    return best


def _statvfs(path: Path | str) -> os.statvfs_result | None:
    """statvfs of path's file system (its nearest existing folder), None if unknown."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return os.statvfs(path)
    except OSError:
        return None


def free_bytes(path: Path | str) -> int | None:
    """Bytes an unprivileged writer may still use on path's file system (its nearest existing folder), None if unknown."""
    st = _statvfs(path)
    return None if st is None else st.f_bavail * st.f_frsize


def _size_bytes(path: Path | str) -> int | None:
    """The size of path's file system (its nearest existing folder), None if unknown."""
    st = _statvfs(path)
    return None if st is None else st.f_blocks * st.f_frsize


def is_read_only(path: Path | str) -> bool:
    """path's file system (its nearest existing folder) is mounted read-only."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def device_words(path: Path | str) -> str:
    """The file system holding path, in words: "tmpfs (mounted on /mnt/x)", or its mount point alone."""
    source, point = mount_of(path)
    if not point:
        return "its file system"
    return f"{source} (mounted on {point})" if source and source != point else point


SPACE_MARGIN = 8 * 2**20   # what an estimate of the room a run needs adds for what it cannot foresee


def no_space_message(folder: Path | str, needed_bytes: int | None = None) -> str:
    """'no space left on DEVICE for FOLDER: free N MB and run again; nothing was lost' (N: needed_bytes less what is
    free now, when known; else what is free now is said)."""
    free = free_bytes(folder)
    mb = 2**20
    size = _size_bytes(folder)
    if needed_bytes is not None and size is not None and needed_bytes - SPACE_MARGIN > size:   # emptying it would not do
        return (f"no space left on {device_words(folder)} for {folder}: it holds {size / mb:.1f} MB in all, less than "
                f"the about {-(-needed_bytes // mb)} MB the run needs; pass an --index-dir on a larger disk "
                "(nothing was lost)")
    if needed_bytes is not None and free is not None:
        to_free = max(1, -(-(needed_bytes - free) // mb))
        how = f"free about {to_free} MB ({free / mb:.1f} MB free now)"
    elif free is not None:
        how = f"free some space ({free / mb:.1f} MB free now)"
    else:
        how = "free some space"
    return f"no space left on {device_words(folder)} for {folder}: {how} and run again; nothing was lost"
