"""Indexed files on disk: a catalog path resolved strictly inside the data folder, and its content type."""
from __future__ import annotations

import mimetypes
from pathlib import Path

from PIL import Image

from retrieval.images.decode import DECODE_ERRORS
from retrieval.images.scan import is_inside


class OutsideDataFolder(PermissionError):
    """The catalog path resolves (through '..' or a symlink) to a file outside the indexed data folder."""


def resolve_inside(data_dir: Path, relative: str) -> Path:
    """data_dir / relative with every symlink resolved, refused unless it stays inside data_dir.

    Raises OutsideDataFolder when it escapes, FileNotFoundError when the file is gone.
    """
    root = Path(data_dir).resolve()
    target = (root / relative).resolve()
    if not is_inside(target, root):
        raise OutsideDataFolder(f"{relative} resolves outside the data folder")
    if not target.is_file():
        raise FileNotFoundError(f"{relative} is no longer in the data folder")
    return target


def image_mimetype(path: Path) -> str:
    """Content type from the file's own header (a PNG named .jpg is image/png), else from its name."""
    try:
        with Image.open(path) as img:
            mime = Image.MIME.get(img.format or "")
    except DECODE_ERRORS:
        mime = None
    return mime or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
