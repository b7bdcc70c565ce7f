"""JPEGs decoded where the network runs (nvJPEG through torchvision on CUDA), resized and cropped there in batches.

The decoding workers hash each JPEG and check its header (images.inspect_jpeg); this module reads the
bytes, decodes a batch in one call, turns each image upright, and resizes and crops it on the device
with an antialiased bilinear filter (Pillow's BILINEAR, which the CPU path uses, is that filter too).
A file the device decoder refuses is decoded on the CPU instead, and a file neither can decode is
skipped with its reason, as on the CPU path. On the CPU the same code runs with torchvision's CPU
decoder (how the tests check it here).
"""
from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from retrieval.files import open_regular
from retrieval.images.decode import DeviceJpeg, ImageDecodeError, Preprocessing, decode_error, decode_for_model
from retrieval.images.scan import unreadable

log = logging.getLogger(__name__)

DECODE_PIXEL_BUDGET = 256_000_000   # pixels decoded per call: bounds device memory (768 MB of RGB) whatever the batch
RESIZE_BYTES_BUDGET = 1 << 30       # float32 bytes resized per call (a 4000x3000 image is 144 MB)
READ_THREADS = 8                    # file reads in parallel (the GIL is released while reading)


@dataclasses.dataclass
class DecodeResult:
    crops: torch.Tensor                   # uint8, shape=(n, 3, crop, crop), on the device; n = len(jpegs) - len(failed)
    decoded: list[int]                    # rows (DeviceJpeg.row) of crops, in order
    failed: dict[int, str]                # row -> reason the file could not be decoded
    on_cpu: int = 0                       # files the device refused and the CPU decoded


class DeviceJpegDecoder:
    """Decodes DeviceJpegs to network-ready uint8 crops on one device (crops(jpegs))."""

    def __init__(self, prep: Preprocessing, device: torch.device, *, max_pixels: int | None):
        self.prep, self.device, self.max_pixels = prep, torch.device(device), max_pixels
        self._reads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="jpeg-read")

    def close(self) -> None:
        self._reads.shutdown(wait=False, cancel_futures=True)

    def crops(self, jpegs: list[DeviceJpeg]) -> DecodeResult:
        """Decode, orient, resize and crop each JPEG; the ones that fail on the device are tried on the CPU."""
        datas = list(self._reads.map(_read_bytes, jpegs))      # bytes, or the reason the read failed
        failed: dict[int, str] = {j.row: d for j, d in zip(jpegs, datas) if isinstance(d, str)}
        todo = [(j, d) for j, d in zip(jpegs, datas) if not isinstance(d, str)]
        done: dict[int, torch.Tensor] = {}                      # row -> (3, crop, crop) uint8 on the device
        on_cpu = 0
        for part in _by_pixel_budget(todo, DECODE_PIXEL_BUDGET):
            upright_images: list[tuple[int, torch.Tensor]] = []
            for (jpeg, data), image in zip(part, self._decode(part)):
                if image is not None:
                    upright_images.append((jpeg.row, upright(image, jpeg.facts.orientation)))
                    continue
                try:                                            # refused by the device decoder: Pillow on the CPU
                    pixels = decode_for_model(data, self.prep, max_pixels=self.max_pixels).pixels
                except ImageDecodeError as exc:
                    failed[jpeg.row] = str(exc)
                    continue
                done[jpeg.row] = torch.from_numpy(pixels).to(self.device)
                on_cpu += 1
            done.update(self._crop_all(upright_images))
        decoded = [j.row for j in jpegs if j.row in done]
        c = self.prep.crop_size
        crops = (torch.stack([done[row] for row in decoded]) if decoded
                 else torch.empty((0, 3, c, c), dtype=torch.uint8, device=self.device))
        return DecodeResult(crops, decoded, failed, on_cpu)

    def _crop_all(self, images: list[tuple[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """Same-size images are resized together (one call per size, a few per batch of photos)."""
        by_shape: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
        for row, image in images:
            by_shape.setdefault(tuple(image.shape), []).append((row, image))
        out: dict[int, torch.Tensor] = {}
        for shape, group in by_shape.items():
            per_call = max(1, RESIZE_BYTES_BUDGET // (4 * int(np.prod(shape))))
            for start in range(0, len(group), per_call):
                chunk = group[start:start + per_call]
                crops = self._crop(torch.stack([image for _, image in chunk]))   # (n, 3, crop, crop)
                out.update((row, crop) for (row, _), crop in zip(chunk, crops))
        return out

    def _decode(self, part: list[tuple[DeviceJpeg, bytearray]]) -> list[torch.Tensor | None]:
        """One batched decode; when it raises, each file alone, so one bad file costs only itself."""
        tensors = [torch.frombuffer(data, dtype=torch.uint8) for _, data in part]   # (nbytes,) each, no copy
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            pass
        out: list[torch.Tensor | None] = []
        for (jpeg, _), tensor in zip(part, tensors):
            try:
                out.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError as exc:
                log.info("the %s JPEG decoder refused %s (%s); decoding it on the CPU", self.device.type,
                         jpeg.path.name, decode_error(exc))
                out.append(None)
        return out

    def _crop(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (n, 3, H, W) upright -> uint8 (n, 3, crop, crop): the shorter side resized to resize_size, centre crop."""
        h, w = images.shape[-2:]
        width, height = self.prep.resized_size(w, h)
        left, top, right, bottom = self.prep.crop_box(width, height)
        if (width, height) == (w, h):
            return images[:, :, top:bottom, left:right]
        x = images.float()
        reduce = draft_scale(w, h, self.prep.resize_size)
        if reduce > 1:   # what Pillow's draft mode has libjpeg do (block means at 1/8), so both paths see one image
            x = F.avg_pool2d(x, reduce, reduce, ceil_mode=True)
        # antialias: an area-weighted downscale (as Pillow's), not a sampling of a 4000 px image at 256 px
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        return x[:, :, top:bottom, left:right].round_().clamp_(0, 255).to(torch.uint8)


def draft_scale(width: int, height: int, min_side: int) -> int:
    """The reduction Pillow's JPEG draft mode picks for a request of (min_side, min_side): 8, 4, 2 or 1, the
    largest that keeps both sides at least min_side (images.open_rgb's draft call)."""
    fits = min(width // min_side, height // min_side)
    return next(s for s in (8, 4, 2, 1) if fits >= s or s == 1)


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as stored -> as seen: EXIF orientation 1..8 applied (as PIL's ImageOps.exif_transpose)."""
    h, w = -2, -1
    if orientation == 2:
        return image.flip(w)
    if orientation == 3:
        return image.flip(h).flip(w)
    if orientation == 4:
        return image.flip(h)
    if orientation == 5:
        return image.transpose(h, w)
    if orientation == 6:
        return image.transpose(h, w).flip(w)        # 90 degrees clockwise
    if orientation == 7:
        return image.transpose(h, w).flip(h).flip(w)
    if orientation == 8:
        return image.transpose(h, w).flip(h)        # 90 degrees anticlockwise
    return image


def _read_bytes(jpeg: DeviceJpeg) -> bytearray | str:
    """The file's bytes, or the reason they cannot be used (unreadable, or changed since it was hashed)."""
    data = bytearray(jpeg.facts.size + 1)          # one more: a file that grew since is caught
    try:
        with open_regular(jpeg.path, buffering=0) as f:
            n = f.readinto(data)
    except OSError as exc:
        return unreadable(exc)
    if n != jpeg.facts.size:
        return "the file changed while it was being indexed; run index-images again"
    del data[n:]
    return data


def _by_pixel_budget(todo: list[tuple[DeviceJpeg, bytearray]], budget: int) -> list[list[tuple[DeviceJpeg, bytearray]]]:
    parts: list[list[tuple[DeviceJpeg, bytearray]]] = []
    pixels = budget
    for item in todo:
        if pixels + item[0].facts.pixels > budget:
            parts.append([])
            pixels = 0
        parts[-1].append(item)
        pixels += item[0].facts.pixels
    return parts

