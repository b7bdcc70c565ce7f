"""Thumbnails: JPEGs no larger than N px on the long side, made on first request and cached on disk."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from retrieval.files import atomic_write
from retrieval.images.decode import DEFAULT_MAX_PIXELS, ImageSource, jpeg_bytes, thumbnail_rgb

log = logging.getLogger(__name__)


def make_thumbnail(source: ImageSource, size: int, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                   max_decoded_pixels: int | None = None, quality: int = 85) -> bytes:
    """Image bytes or file -> JPEG bytes, long side <= size px, upright RGB. Raises retrieval.images.decode.ImageDecodeError.

    JPEGs decode in draft mode near the target size; other images are resized in their own mode before
    they become RGB (see retrieval.images.decode.thumbnail_rgb), and a file is read as Pillow needs it."""
    return jpeg_bytes(thumbnail_rgb(source, size, max_pixels=max_pixels, max_decoded_pixels=max_decoded_pixels),
                      quality)


_THUMBNAIL_NAME = re.compile(r"(\d+)-([0-9a-f]{16})-(\d+)\.jpg")


class ThumbnailCache:
    """folder/<id>-<sha256 prefix>-<size>.jpg per image; written atomically so readers never see half a file."""

    def __init__(self, folder: Path, size: int = 256, *, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        assert size >= 16, "thumbnail size must be at least 16 px"
        self.folder, self.size, self.max_pixels = Path(folder), size, max_pixels
        self._warned = False   # a folder that cannot be written is said once, not per request

    def path_for(self, image_id: int, sha256: str) -> Path:
        return self.folder / f"{int(image_id)}-{sha256[:16]}-{self.size}.jpg"

    def prune(self, records: dict[int, str]) -> int:
        """Remove the cached thumbnails of images the index no longer holds (removed, or changed: a new id), and those
        made at another size. records: id -> sha256 of every indexed image. -> files removed. Left alone, a folder
        whose images came and went kept every thumbnail ever made."""
        removed = 0
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return 0
        for entry in entries:
            match = _THUMBNAIL_NAME.fullmatch(entry.name)
            if match is None:
                continue   # not a thumbnail (recent-queries.db, the uploads' previews)
            image_id, prefix, size = int(match[1]), match[2], int(match[3])
            if size == self.size and records.get(image_id, "")[:16] == prefix:
                continue
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass       # gone already (another worker), or the folder is read-only: a cache, no harm
        return removed

    def get(self, image_id: int, sha256: str, source: Path, *, keep: bool = True) -> Path | bytes:
        """The cached thumbnail of image_id, made from source first if needed: its file, or its JPEG bytes when the
        folder cannot keep it (read-only, full, a file in its place; logged once) or keep is False (source is no
        longer the file sha256 names: made, not kept under that name). Raises ImageDecodeError, OSError (reading
        source)."""
        target = self.path_for(image_id, sha256)
        if keep and target.is_file():
            return target
        jpeg = make_thumbnail(source, self.size, max_pixels=self.max_pixels)   # never read whole into memory
        if not keep:
            return jpeg
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(target, jpeg, durable=False)   # a cache: a power cut may lose it, never show half of it
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("thumbnails cannot be cached in %s (%s); they are made for each request and served "
                            "from memory", self.folder, exc.strerror or exc)
            return jpeg
        log.debug("made thumbnail %s", target.name)
        return target
