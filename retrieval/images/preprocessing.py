"""How an image becomes the network's input: resize the shorter side, centre-crop (on the CPU, to uint8), normalise
(on the network's device); and the text an index records of it."""
from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:   # torch is imported only where a tensor is made: decoder processes and the planner never load it
    import torch

# The catalog's record of a Preprocessing (IndexSettings.preprocessing), as every index has written it:
# "resize=256,crop=224,mean=[0.485, 0.456, 0.406],std=[0.229, 0.224, 0.225],interpolation=bilinear", and
# ",input_norm=image" after it for an index whose input is normalised by each image's own statistics, and
# ",regions=5" for an index that also holds regional vectors (index-images --regions)
_RECORD = re.compile(r"resize=(\d+),crop=(\d+),mean=\[([^\]]*)\],std=\[([^\]]*)\],interpolation=bilinear"
                     r"(?:,input_norm=(image))?(?:,regions=(\d+))?")
# index-images --regions: besides the whole image, REGION_COUNT regions of it, each REGION_SCALE of each side: the four
# corners and the centre. Chosen by benchmarks/bench_regions.py on seed 0 (0.8 took cropped copies' recall@1 from
# 0.67 to 0.89; 0.65 lost), docs/quality.md
REGION_COUNT = 5
REGION_SCALE = 0.8
IMAGE_STD_FLOOR = 0.02   # input_norm "image": a channel's standard deviation is taken as at least this (about 5 grey
                         # levels), so a flat image's noise is not blown up to the size of a photo's content


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side, centre-crop, and normalise: the weights' own transform settings.

    input_norm "weights": every image normalised by the weights' mean and std (as they were trained); "image": each
    image by its own per-channel mean and standard deviation, so a brighter, darker, flatter or colour-cast copy of
    a picture gives the network (almost) the same input."""
    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    input_norm: str = "weights"
    regions: int = 0       # index-images --regions: also crop each decoded image's REGION_COUNT regions (region_boxes)

    def to_record(self) -> str:
        """The text an index records of it: "resize=256,crop=224,mean=[...],std=[...],interpolation=bilinear", and
        ",input_norm=image" when the input is normalised per image, ",regions=5" when regions are cropped too."""
        return (f"resize={self.resize_size},crop={self.crop_size},mean={list(self.mean)},std={list(self.std)},"
                "interpolation=bilinear" + ("" if self.input_norm == "weights" else f",input_norm={self.input_norm}")
                + (f",regions={self.regions}" if self.regions else ""))

    @classmethod
    def from_record(cls, text: str) -> Preprocessing:
        """The Preprocessing an index recorded (to_record's text). Raises ValueError for any other text."""
        match = _RECORD.fullmatch(text)
        if match is None:
            raise ValueError(f"not a preprocessing record: {text!r}")
        resize, crop, mean, std, input_norm, regions = match.groups()
        return cls(resize_size=int(resize), crop_size=int(crop), mean=_floats(mean), std=_floats(std),
                   input_norm=input_norm or "weights", regions=int(regions or 0))

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """torchvision's resize(int) rule: the shorter side becomes resize_size."""
        if width <= height:
            return self.resize_size, int(self.resize_size * height / width)
        return int(self.resize_size * width / height), self.resize_size

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The centre crop_size square of a resized width x height image."""
        c = self.crop_size
        left, top = int(round((width - c) / 2.0)), int(round((height - c) / 2.0))
        return left, top, left + c, top + c

    def crop(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> uint8 array, shape=(3, crop, crop). Normalisation happens on the device."""
        size = self.resized_size(*img.size)
        if size != img.size:
            img = img.resize(size, Image.BILINEAR)
        arr = np.asarray(img.crop(self.crop_box(*size)), dtype=np.uint8)   # (H, W, 3)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))                # (3, H, W)

    def normalise(self, batch: "torch.Tensor") -> "torch.Tensor":
        """uint8 (B, 3, H, W) -> float32 normalised (B, 3, H, W), on batch's device: by the weights' mean and std,
        or (input_norm "image") each image and channel to mean 0 and standard deviation 1."""
        import torch

        x = batch.float() / 255.0
        if self.input_norm == "image":
            std, mean = torch.std_mean(x, dim=(2, 3), keepdim=True)
            return (x - mean) / std.clamp_min(IMAGE_STD_FLOOR)
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return (x - mean) / std


def region_boxes(width: int, height: int, count: int = REGION_COUNT,
                 scale: float = REGION_SCALE) -> list[tuple[int, int, int, int]]:
    """The regions index-images --regions adds of a width x height image: its four corners and its centre (count 5),
    each scale x width by scale x height, as (left, top, right, bottom)."""
    assert count == REGION_COUNT, f"only {REGION_COUNT} regions are defined, not {count}"
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    corners = [(0, 0), (width - w, 0), (0, height - h), (width - w, height - h), ((width - w) // 2, (height - h) // 2)]
    return [(x, y, x + w, y + h) for x, y in corners]


def _floats(text: str) -> tuple[float, float, float]:
    """"0.485, 0.456, 0.406" -> (0.485, 0.456, 0.406). Raises ValueError."""
    values = tuple(float(part) for part in text.split(","))
    if len(values) != 3:
        raise ValueError(f"want three channel values, not {text!r}")
    return values
