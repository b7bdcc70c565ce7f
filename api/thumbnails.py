"""Thumbnails: JPEGs no larger than N px on the long side, made on first request and cached on disk."""
from __future__ import annotations

import logging
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


class ThumbnailCache:
    """folder/<id>-<sha256 prefix>-<size>.jpg per image; written atomically so readers never see half a file."""

    def __init__(self, folder: Path, size: int = 256, *, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        assert size >= 16, "thumbnail size must be at least 16 px"
        self.folder, self.size, self.max_pixels = Path(folder), size, max_pixels
        self._warned = False   # a folder that cannot be written is said once, not per request

    def path_for(self, image_id: int, sha256: str) -> Path:
        return self.folder / f"{int(image_id)}-{sha256[:16]}-{self.size}.jpg"

    def get(self, image_id: int, sha256: str, source: Path) -> Path | bytes:
        """The cached thumbnail of image_id, made from source first if needed: its file, or its JPEG bytes when the
        folder cannot keep it (read-only, full, a file in its place; logged once). Raises ImageDecodeError, OSError
        (reading source)."""
        target = self.path_for(image_id, sha256)
        if target.is_file():
            return target
        jpeg = make_thumbnail(source, self.size, max_pixels=self.max_pixels)   # never read whole into memory
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
