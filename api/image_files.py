"""Indexed files on disk: a catalog path resolved strictly inside the data folder, and its content type."""
from __future__ import annotations

from pathlib import Path

from retrieval.files import NotARegularFile, open_regular
from retrieval.images.decode import DECODE_ERRORS, open_image
from retrieval.images.scan import is_inside


class OutsideDataFolder(PermissionError):
    """The catalog path resolves (through '..' or a symlink) to a file outside the indexed data folder."""


class NotAnImageNow(ValueError):
    """The indexed path is there but holds no image any more (overwritten, or now a named pipe or a folder)."""


def resolve_inside(data_dir: Path, relative: str) -> Path:
    """data_dir / relative with every symlink resolved, refused unless it stays inside data_dir.

    Raises OutsideDataFolder when it escapes, FileNotFoundError when the file is gone, NotAnImageNow when the
    path is something else than a regular file now (a named pipe, a folder).
    """
    root = Path(data_dir).resolve()
    target = (root / relative).resolve()
    if not is_inside(target, root):
        raise OutsideDataFolder(f"{relative} resolves outside the data folder")
    if not target.exists():
        raise FileNotFoundError(f"{relative} is no longer in the data folder")
    if not target.is_file():
        raise NotAnImageNow("it is not a regular file now")
    return target


# READ_FORMATS' types; a phone's multi-picture JPEG (MPO) is a JPEG to a browser (Pillow says image/mpo, which a
# browser opened on its own would download rather than show)
_MIME_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp",
               "GIF": "image/gif", "TIFF": "image/tiff"}


def image_mimetype(path: Path) -> str:
    """Content type from the file's own header (a PNG named .jpg is image/png). Raises NotAnImageNow when the file
    is no image of the formats read (retrieval.images.decode.READ_FORMATS) any more."""
    try:
        with open_regular(path) as f, open_image(f) as img:
            mime = _MIME_TYPES.get(img.format or "")
    except NotARegularFile:
        raise NotAnImageNow("it is not a regular file now") from None
    except DECODE_ERRORS as exc:
        raise NotAnImageNow(f"it is not an image now ({type(exc).__name__})") from None
    return mime or "application/octet-stream"
