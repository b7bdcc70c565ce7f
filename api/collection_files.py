"""The collection's files as the server hands them out: an indexed image's original, its cached thumbnail, the
thumbnails' housekeeping, and whether the data folder is there at all. (api.service holds the index, searches and
health; this is what the image and thumbnail addresses and the pages' banner need of the disk.)"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from retrieval.catalog import ImageRecord
from retrieval.images.decode import ImageDecodeError
from retrieval.search.index import ImageIndex
from retrieval.search.snapshot import IndexSnapshot
from retrieval.system import shown_name

from api.errors import ApiError
from api.image_files import NotAnImageNow, OutsideDataFolder, resolve_inside
from api.thumbnails import ThumbnailCache

log = logging.getLogger(__name__)

THUMBNAIL_DECODES = 2           # thumbnails made at once (each decodes a collection file, up to MAX_PIXELS)
DATA_FOLDER_LOOK_S = 5.0        # how often the pages' "data folder not there" note looks at the folder
PRUNE_EVERY_S = 60.0            # cached thumbnails are pruned after a reload at most this often


def indexed_record(snapshot: IndexSnapshot, image_id: int) -> ImageRecord:
    """An indexed image's catalog row in snapshot. Raises ApiError 404."""
    record = snapshot.catalog.get(image_id)
    if record is None:
        raise ApiError(404, "not_found", f"no image with id {image_id} in the index")
    return record


def _as_indexed(path: Path, record: ImageRecord) -> bool:
    """Whether the file is as it was indexed, by its size and modification time (what index-images compares)."""
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_size == record.size and st.st_mtime_ns == record.mtime_ns


class CollectionFiles:
    """The indexed images' files and thumbnails, for many request threads at once."""

    def __init__(self, index: ImageIndex, thumbnails: ThumbnailCache):
        self.index, self.thumbnails = index, thumbnails
        self._thumbnail_slots = threading.BoundedSemaphore(THUMBNAIL_DECODES)
        self._pruned_at = float("-inf")   # when the cached thumbnails were last pruned after a reload (monotonic)
        self._data_folder_look: tuple[Path, float, bool] | None = None   # (folder, when, there): data_folder_missing

    def image_file(self, image_id: int) -> tuple[Path, str | None]:
        """The resolved file of an indexed image, and its indexed sha256 while the file is as indexed (its size and
        modification time; None once it changed and is not re-indexed yet: its bytes are then not those the hash
        names). Raises ApiError 404 (unknown id, file gone), 403 (outside the folder)."""
        snapshot = self.index.snapshot()        # the row and the folder it is relative to: one index
        record = indexed_record(snapshot, image_id)
        path = _resolve(record, snapshot.data_dir)
        return path, record.sha256 if _as_indexed(path, record) else None

    def thumbnail_file(self, image_id: int) -> tuple[bytes, str, str | None]:
        """The JPEG thumbnail of an indexed image, cached on disk; a validator for its ETag; and the image's indexed
        sha256 while the file is as indexed (else None, and the thumbnail, made from the bytes there now, is not kept
        under the indexed hash's name). Bytes, not a path: a reload's prune may remove the file before it is sent.
        Raises ApiError 404, 403."""
        snapshot = self.index.snapshot()
        record = indexed_record(snapshot, image_id)
        etag = f"{record.id}-{record.sha256[:16]}-{self.thumbnails.size}"
        try:
            source = _resolve(record, snapshot.data_dir)
        except ApiError as exc:
            if exc.code == "file_missing":   # the drive unmounted, or deleted and not re-indexed yet: the picture as
                try:                          # it was indexed, where it was cached
                    return self.thumbnails.path_for(record.id, record.sha256).read_bytes(), etag, record.sha256
                except OSError:
                    pass
            raise
        current = _as_indexed(source, record)
        try:
            with self._thumbnail_slots:         # full-size decodes of collection files: a few at a time
                for _ in range(2):
                    made = self.thumbnails.get(record.id, record.sha256, source, keep=current)
                    if isinstance(made, bytes):
                        break
                    try:
                        made = made.read_bytes()
                        break
                    except FileNotFoundError:   # pruned just now: made again
                        continue
                else:
                    raise ApiError(404, "file_missing", f"the thumbnail of image {image_id} could not be kept")
        except ImageDecodeError as exc:
            raise ApiError(404, "file_unreadable", f"the file of image {image_id} can no longer be decoded: {exc}") from exc
        return made, etag if current else f"{etag}-{source.stat().st_mtime_ns:x}", record.sha256 if current else None

    def prune_thumbnails(self, *, throttled: bool = False) -> None:
        """The cached thumbnails of images no longer indexed, or changed since, go: as a worker starts (in the
        background), and after reloads (throttled: at most once in PRUNE_EVERY_S; a PostgreSQL catalog reloads on
        every commit of a long run, and a prune lists the folder and every image's hash)."""
        if throttled:
            if time.monotonic() - self._pruned_at < PRUNE_EVERY_S:
                return
            self._pruned_at = time.monotonic()
        try:
            removed = self.thumbnails.prune(self.index.snapshot().catalog.hash_prefixes())
        except Exception as exc:  # noqa: BLE001 - a cache's housekeeping never stops a server
            log.warning("cached thumbnails were not pruned: %s", exc)
            return
        if removed:
            log.info("removed %d cached thumbnail(s) of images no longer in the index", removed)

    def data_folder_missing(self, index_dir: Path, *, whole_path: bool = True) -> str | None:
        """What to say when the index's data folder is not there (a drive not mounted, the folder moved): searches
        still answer, from the vectors, but pictures whose thumbnails were not cached cannot be shown. whole_path:
        the folder's and index_dir's whole paths (/healthz, an operator's), else the folder's name only (the pages,
        anyone's). Looked at once in DATA_FOLDER_LOOK_S (every page asks; a hung network mount would hang them all)."""
        data_dir = self.index.snapshot().data_dir
        now = time.monotonic()
        looked = self._data_folder_look
        if looked is None or looked[0] != data_dir or now - looked[1] > DATA_FOLDER_LOOK_S:
            looked = self._data_folder_look = (data_dir, now, data_dir.is_dir())
        if looked[2]:
            return None
        shown = shown_name(str(data_dir)) if whole_path else shown_name(data_dir.name)
        index = shown_name(str(index_dir)) if whole_path else "INDEX"
        return (f"the data folder {shown} is not there (a drive not mounted? the folder moved?): searches still "
                f"answer, but pictures not seen before cannot be shown. If it moved: index-images NEW_PLACE "
                f"--index-dir {index} --data-moved")


def _resolve(record: ImageRecord, data_dir: Path) -> Path:
    """The record's file inside data_dir. Raises ApiError 403 (it resolves outside), 404 (gone, or no image now)."""
    try:
        return resolve_inside(data_dir, record.path)
    except OutsideDataFolder:
        log.warning("refused to serve image %d: %s resolves outside %s", record.id, record.path, data_dir)
        raise ApiError(403, "forbidden", f"image {record.id} is outside the indexed data folder and is not served") from None
    except FileNotFoundError:
        raise ApiError(404, "file_missing", f"the file of image {record.id} is no longer in the data folder") from None
    except NotAnImageNow as exc:
        raise ApiError(404, "file_unreadable", f"the file of image {record.id} can no longer be decoded: {exc}") \
            from None
