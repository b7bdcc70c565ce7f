"""Finding image files in a data folder: a torch-free walk that gives each file its label, size and mtime."""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
from pathlib import Path
from typing import Iterable

from retrieval.files import file_kind

log = logging.getLogger(__name__)

# Files larger than this are skipped unread: no photo is this large, and decoding one would cost gigabytes.
DEFAULT_MAX_FILE_BYTES = 512 * 1024 * 1024

# Folders a NAS, a camera card or an OS keeps beside the photos, never photos of the collection: a Synology share has
# an @eaDir/NAME.jpg/SYNOFILE_THUMB_M.jpg for every photo (indexed, they were a near-duplicate of each), recycle bins
SYSTEM_FOLDERS = frozenset({"@eaDir", "#recycle", "#snapshot", "@Recycle", "@Recently-Snapshot", "$RECYCLE.BIN",
                            "System Volume Information", "lost+found"})
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Photos in formats Pillow does not read (a phone's HEIC, a camera's raw files): counted, so that a folder of them is
# not indexed in silence
UNREADABLE_PHOTO_EXTENSIONS = frozenset({".heic", ".heif", ".jxl", ".dng", ".nef", ".nrw", ".cr2", ".cr3",
                                         ".crw", ".arw", ".srf", ".sr2", ".raf", ".orf", ".rw2", ".pef", ".srw",
                                         ".x3f", ".3fr", ".iiq", ".erf", ".mrw", ".raw"})


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
    folders: dict[str, str] = dataclasses.field(default_factory=dict)   # folders not looked into -> why ("." the
                                                                        # data folder itself)
    unlisted: frozenset[str] = frozenset()   # those of them that could not be listed (relative paths): what they held
                                             # may still be there
    unreadable_formats: dict[str, int] = dataclasses.field(default_factory=dict)   # ".heic" -> files of photo formats
                                                                                   # not read (UNREADABLE_PHOTO_...)


def scan_folder(data_dir: Path, *, exclude: Iterable[Path] = (), skip_folders_holding: str | None = None,
                max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES) -> ScanResult:
    """Walk data_dir recursively for image files, sorted by path.

    Hidden files and folders are skipped, and so are the folders in exclude and any folder holding a
    file named skip_folders_holding (an index folder kept inside the data folder is not images).
    Folder symlinks are followed after every real folder has been walked, and only to a folder inside
    data_dir not walked yet: a link to a class folder (a "Favourites" shortcut) never takes its images
    and label, and loops cannot hang the walk. Folders not looked into (a link out of data_dir or to a
    folder already walked, one that cannot be listed) are in the result's folders with the reason;
    file symlinks that point outside data_dir, and files over max_file_bytes, are reported as skipped
    without being read. Names that are not valid UTF-8 are kept as Python keeps them (surrogate escapes).
    """
    root = Path(data_dir).resolve()
    images: list[ImageFile] = []
    skipped: dict[str, str] = {}
    folders: dict[str, str] = {}
    unlisted: set[str] = set()
    excluded = {Path(p).resolve() for p in exclude}
    formats: dict[str, int] = {}
    walked: dict[Path, str] = {}                 # real folder -> the relative path it was walked as
    links: list[tuple[Path, str]] = []          # folder symlinks met, walked once the real folders have been

    def walk(folder: Path, rel: str) -> None:
        real = folder.resolve()
        if real in walked or real in excluded:
            return
        walked[real] = rel
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            folders[rel] = f"cannot be listed: {exc.strerror or exc}"
            unlisted.add(rel)
            return
        if folder != root and skip_folders_holding and any(e.name == skip_folders_holding for e in entries):
            log.info("not scanning %s: it is an index folder", folder)
            held_by_index(entries)
            return
        for entry in entries:
            if entry.name.startswith(".") or (entry.name in SYSTEM_FOLDERS and entry.is_dir(follow_symlinks=False)):
                continue
            entry_rel = Path(entry.path).relative_to(root).as_posix()
            try:
                visit(entry, entry_rel)
            except (OSError, RuntimeError) as exc:   # a symlink loop (ELOOP; RuntimeError from resolve()), a race
                reason = unreadable_entry(exc)
                if Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
                    skipped[entry_rel] = reason
                else:
                    log.info("not scanning %s: %s", entry_rel, reason)

    def held_by_index(entries: list[os.DirEntry]) -> None:
        """The images lying in an index folder itself (one made in a class folder by mistake) are named as skipped,
        not left out silently; its subfolders (the server's thumbnails) are not looked into."""
        for entry in entries:
            if not entry.name.startswith(".") and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
                skipped[Path(entry.path).relative_to(root).as_posix()] = (
                    f"in a folder that holds an index ({skip_folders_holding}): not indexed; move that index out of "
                    "the data folder to index it")

    def visit(entry: os.DirEntry, rel: str) -> None:
        full = Path(entry.path)
        if entry.is_dir(follow_symlinks=True):
            if entry.is_symlink():
                links.append((full, rel))
            else:
                walk(full, rel)
            return
        if full.suffix.lower() not in IMAGE_EXTENSIONS:
            if full.suffix.lower() in UNREADABLE_PHOTO_EXTENSIONS:
                formats[full.suffix.lower()] = formats.get(full.suffix.lower(), 0) + 1
            return
        if entry.is_symlink() and not os.path.exists(full):
            skipped[rel] = "symlink to a file that is not there"
            return
        if entry.is_symlink() and not is_inside(full.resolve(), root):
            skipped[rel] = "symlink points outside the data folder"
            return
        st = entry.stat(follow_symlinks=True)
        if not stat.S_ISREG(st.st_mode):   # a named pipe or a device named like a photo: said, never opened
            skipped[rel] = f"not a regular file ({file_kind(st.st_mode)})"
            return
        if max_file_bytes is not None and st.st_size > max_file_bytes:
            skipped[rel] = (f"file too large ({st.st_size / 2**20:,.0f} MB, limit {max_file_bytes / 2**20:,.0f} MB): "
                            "not read")
            return
        parts = rel.split("/")
        label = parts[0] if len(parts) > 1 else None
        images.append(ImageFile(rel, label, st.st_size, st.st_mtime_ns))

    def follow(link: Path, rel: str) -> None:
        try:
            target = link.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            folders[rel] = f"a folder link that cannot be followed ({unreadable_entry(exc)})"
            return
        if not is_inside(target, root):
            folders[rel] = (f"a link to a folder outside the data folder ({target}); the server shows only files "
                            "inside the data folder: move or copy the folder in")
        elif target in excluded:
            folders[rel] = "a link to the index folder"
        elif target in walked:
            where = walked[target]
            folders[rel] = ("a link to the data folder itself" if where == "." else
                            f"a link to the folder {where}, which is indexed under its own name")
        else:
            walk(link, rel)

    walk(root, ".")
    while links:                 # walking a linked folder may meet more links: each in its turn
        follow(*links.pop(0))
    images.sort(key=lambda f: f.path)
    return ScanResult(images, skipped, dict(sorted(folders.items())), frozenset(unlisted), dict(sorted(formats.items())))


UNREADABLE = "cannot read file: "   # the start of the reason for a file the OS would not read (permissions, a share)


def unreadable(exc: OSError) -> str:
    """The reason for a file the OS would not read, in words."""
    return f"{UNREADABLE}{exc.strerror or exc}"


def may_read_later(reason: str) -> bool:
    """Whether a file skipped for this reason is worth trying again though it has not changed: a file the OS would not
    read (chmod, a share that failed) is tried on every run, at the cost of an open; a file that would not decode is
    tried once it changes."""
    return reason.startswith(UNREADABLE)


def unreadable_entry(exc: OSError | RuntimeError) -> str:
    """Why a folder entry could not be looked at, in words (a skipped file's reason)."""
    if isinstance(exc, RuntimeError) or exc.errno == errno.ELOOP:
        return "a symlink loop: it never leads to a file"
    return f"cannot be looked at: {exc.strerror or exc}"


def is_inside(path: Path, root: Path) -> bool:
    """Whether path is root or lies under it (both already resolved)."""
    return path == root or root in path.parents
