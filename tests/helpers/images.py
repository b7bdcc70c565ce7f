"""Pictures for the tests as bytes: encode(image, format) and bad_files(), the undecodable files an indexer must skip."""
from __future__ import annotations

import io

from PIL import Image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    """img saved in format fmt (Pillow's name: "JPEG", "PNG", ...) with Pillow's save options kw -> the file's bytes."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def bad_files() -> dict[str, bytes]:
    """kind -> the bytes of a file no decoder should accept: empty, text, a truncated JPEG, a decompression bomb."""
    good = encode(Image.new("RGB", (300, 200), (200, 30, 30)), "JPEG")
    return {
        "empty": b"",
        "text": b"hello, I am not a picture\n" * 10,
        "truncated": good[: len(good) // 2],
        "bomb": encode(Image.new("1", (10000, 9000)), "PNG"),   # 90 Mpx, over Pillow's default limit
    }
