"""Finding image files in a data folder: a torch-free walk that gives each file its label, size and mtime."""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

# Files larger than this are skipped unread: no photo is this large, and decoding one would cost gigabytes.
DEFAULT_MAX_FILE_BYTES = 512 * 1024 * 1024

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """One image file found under the data folder."""
    path: str            # relative to the data folder, with '/' separators
    label: str | None    # first folder level under the data folder; None for top-level files
    size: int            # bytes
    mtime_ns: int        # modification time, nanoseconds


@dataclasses.dataclass(frozen=True)
class ScanResult:
    images: list[ImageFile]
    skipped: dict[str, str]   # relative path -> reason (files we refuse before decoding)


def scan_folder(data_dir: Path, *, exclude: Iterable[Path] = (), skip_folders_holding: str | None = None,
                max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES) -> ScanResult:
    """Walk data_dir recursively for image files, sorted by path.

    Hidden files and folders are skipped, and so are the folders in exclude and any folder holding a
    file named skip_folders_holding (an index folder kept inside the data folder is not images).
    Directory symlinks are followed only when they resolve to a folder inside data_dir not yet
    visited, so loops cannot hang the walk; file symlinks that point outside data_dir, and files
    over max_file_bytes, are reported as skipped without being read.
    Names that are not valid UTF-8 are kept as Python keeps them (surrogate escapes).
    """
    root = Path(data_dir).resolve()
    images: list[ImageFile] = []
    skipped: dict[str, str] = {}
    visited: set[Path] = {Path(p).resolve() for p in exclude}

    def walk(folder: Path) -> None:
        real = folder.resolve()
        if real in visited:
            return
        visited.add(real)
        if folder != root and skip_folders_holding and (folder / skip_folders_holding).exists():
            log.info("not scanning %s: it is an index folder", folder)
            held_by_index(folder)
            return
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            log.warning("cannot list %s: %s", folder, exc)
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = Path(entry.path).relative_to(root).as_posix()
            try:
                visit(entry, rel)
            except (OSError, RuntimeError) as exc:   # a symlink loop (ELOOP; RuntimeError from resolve()), a race
                reason = unreadable_entry(exc)
                if Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
                    skipped[rel] = reason
                else:
                    log.info("not scanning %s: %s", rel, reason)

    def held_by_index(folder: Path) -> None:
        """The images lying in an index folder itself (one made in a class folder by mistake) are named as skipped,
        not left out silently; its subfolders (the server's thumbnails) are not looked into."""
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            if not entry.name.startswith(".") and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
                skipped[Path(entry.path).relative_to(root).as_posix()] = (
                    f"in a folder that holds an index ({skip_folders_holding}): not indexed; move that index out of "
                    "the data folder to index it")

    def visit(entry: os.DirEntry, rel: str) -> None:
        full = Path(entry.path)
        if entry.is_dir(follow_symlinks=True):
            if entry.is_symlink() and not is_inside(full.resolve(), root):
                log.info("not following %s: it points outside the data folder", rel)
                return
            walk(full)
            return
        if full.suffix.lower() not in IMAGE_EXTENSIONS:
            return
        if not entry.is_file(follow_symlinks=True):
            if entry.is_symlink() and not os.path.exists(full):
                skipped[rel] = "symlink to a file that is not there"
            return
        if entry.is_symlink() and not is_inside(full.resolve(), root):
            skipped[rel] = "symlink points outside the data folder"
            return
        st = entry.stat(follow_symlinks=True)
        if max_file_bytes is not None and st.st_size > max_file_bytes:
            skipped[rel] = (f"file too large ({st.st_size / 2**20:,.0f} MB, limit {max_file_bytes / 2**20:,.0f} MB): "
                            "not read")
            return
        parts = rel.split("/")
        label = parts[0] if len(parts) > 1 else None
        images.append(ImageFile(rel, label, st.st_size, st.st_mtime_ns))

    walk(root)
    images.sort(key=lambda f: f.path)
    return ScanResult(images, skipped)


def unreadable_entry(exc: OSError | RuntimeError) -> str:
    """Why a folder entry could not be looked at, in words (a skipped file's reason)."""
    if isinstance(exc, RuntimeError) or exc.errno == errno.ELOOP:
        return "a symlink loop: it never leads to a file"
    return f"cannot be looked at: {exc.strerror or exc}"


def is_inside(path: Path, root: Path) -> bool:
    """Whether path is root or lies under it (both already resolved)."""
    return path == root or root in path.parents
