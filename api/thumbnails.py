"""Thumbnails: JPEGs no larger than N px on the long side, made on first request and cached on disk."""
from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path

from PIL import Image

from retrieval.images import DEFAULT_MAX_PIXELS, open_rgb

log = logging.getLogger(__name__)


def make_thumbnail(data: bytes, size: int, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, quality: int = 85) -> bytes:
    """Image bytes -> JPEG bytes, long side <= size px, upright RGB. Raises retrieval.images.ImageDecodeError."""
    img = open_rgb(data, min_side=size, max_pixels=max_pixels)   # JPEG draft mode: decoded near the target size
    img.thumbnail((size, size), Image.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality, optimize=True, progressive=True)
    return out.getvalue()


class ThumbnailCache:
    """folder/<id>-<sha256 prefix>-<size>.jpg per image; written atomically so readers never see half a file."""

    def __init__(self, folder: Path, size: int = 256, *, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        assert size >= 16, "thumbnail size must be at least 16 px"
        self.folder, self.size, self.max_pixels = Path(folder), size, max_pixels

    def path_for(self, image_id: int, sha256: str) -> Path:
        return self.folder / f"{int(image_id)}-{sha256[:16]}-{self.size}.jpg"

    def get(self, image_id: int, sha256: str, source: Path) -> Path:
        """The cached thumbnail of image_id, made from source first if needed. Raises ImageDecodeError, OSError."""
        target = self.path_for(image_id, sha256)
        if target.exists():
            return target
        jpeg = make_thumbnail(source.read_bytes(), self.size, max_pixels=self.max_pixels)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(jpeg)
        os.replace(tmp, target)
        log.debug("made thumbnail %s", target.name)
        return target
