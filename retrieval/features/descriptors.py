"""Descriptors beyond fc6/fc7: the last convolutional block pooled (MAC, SPoC, GeM, R-MAC), and a descriptor
averaged over views of the image (its mirror, a few scales). Plain torch modules on whatever device the network
is on (CPU or CUDA); the names the command lines use are in retrieval.names (POOLED_LAYERS, VIEWS)."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.names import POOLED_LAYERS, VIEWS

GEM_P = 3.0        # generalised mean: p=1 is SPoC (the average), p -> infinity is MAC (the maximum); 3 (Radenović et al.)
RMAC_LEVELS = 3    # R-MAC regions: 1, 2x2 and 3x3 squares of a square map (Tolias et al. 2016)
RMAC_OVERLAP = 0.4 # ... overlapping by about this share of a region's side between neighbours
EPS = 1e-6
# flip+scales: the image at these scales of the network's input (224 -> 158, 224, 317) and each one mirrored
SCALES = (1 / math.sqrt(2), 1.0, math.sqrt(2))
# Up to this many images, the views of one scale (an image and its mirror) go through the network as one batch:
# the fc layers then read their weights (218 MB for AlexNet in fp32) once instead of once per view. AlexNet fc7,
# one image with its mirror on the 2-core AMD EPYC: 135 -> 90 ms fp32, 684 -> 332 ms bf16 (two busy threads).
# Larger batches are bound by computation, not by reading weights: one pass per view, in the memory of one.
ONE_PASS_MAX_IMAGES = 8


def mac(x: torch.Tensor) -> torch.Tensor:
    """Maximum of each channel. x shape=(B, C, H, W) -> (B, C)."""
    return x.amax(dim=(2, 3))


def spoc(x: torch.Tensor) -> torch.Tensor:
    """Sum-pooled (here: averaged; the same vector once L2-normalised) channels. (B, C, H, W) -> (B, C)."""
    return x.mean(dim=(2, 3))


def gem(x: torch.Tensor, p: float = GEM_P) -> torch.Tensor:
    """Generalised mean of each channel, (mean of x^p)^(1/p), over the positive activations. (B, C, H, W) -> (B, C).

    Computed relative to each channel's maximum, so that x^p neither underflows nor overflows whatever p."""
    x = x.clamp(min=EPS)
    top = x.amax(dim=(2, 3), keepdim=True)                                      # (B, C, 1, 1)
    return top.flatten(1) * (x / top).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


@functools.lru_cache(maxsize=64)
def rmac_regions(height: int, width: int, levels: int = RMAC_LEVELS) -> tuple[tuple[int, int, int], ...]:
    """R-MAC's square regions of a height x width map: (top, left, side) each. Level l has regions of side
    2*min(H, W)/(l+1), l of them across the shorter side and as many along the longer one as keep neighbours
    overlapping by about RMAC_OVERLAP (Tolias et al. 2016: a 1, 2x2, 3x3 grid on a square map)."""
    short, long_ = min(height, width), max(height, width)
    extra = 0                    # regions added along the longer side, chosen once for every level
    if long_ > short:
        steps = range(1, 7)
        extra = min(steps, key=lambda n: abs((short * short - short * (long_ - short) / n) / (short * short) - RMAC_OVERLAP))
    regions = []
    for level in range(1, levels + 1):
        side = max(1, int(2 * short / (level + 1)))
        across_h = level + (extra if height > width else 0)
        across_w = level + (extra if width > height else 0)
        tops = _starts(height, side, across_h)
        lefts = _starts(width, side, across_w)
        regions += [(t, left, side) for t in tops for left in lefts]
    return tuple(dict.fromkeys(regions))     # a tiny map repeats regions: each counts once


def _starts(length: int, side: int, count: int) -> list[int]:
    """count region starts spread evenly over length (first at 0, last ending at length)."""
    if count == 1 or side >= length:
        return [max(0, (length - side) // 2)] if count == 1 else [0]
    return [int(round(i * (length - side) / (count - 1))) for i in range(count)]


def rmac(x: torch.Tensor, levels: int = RMAC_LEVELS) -> torch.Tensor:
    """Regional MAC: the MAC of each region (rmac_regions), each L2-normalised, summed. (B, C, H, W) -> (B, C)."""
    total = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
    for top, left, side in rmac_regions(x.shape[2], x.shape[3], levels):
        total += F.normalize(mac(x[:, :, top:top + side, left:left + side]), dim=1, eps=EPS)   # (B, C)
    return total


POOLINGS = {"mac": mac, "spoc": spoc, "gem": gem, "rmac": rmac}
assert tuple(f"conv5-{p}" for p in POOLINGS) == POOLED_LAYERS, "retrieval.names.POOLED_LAYERS lists the poolings"


def is_pooled(layer: str) -> bool:
    return layer in POOLED_LAYERS


class PooledConv(nn.Module):
    """The convolutional body up to the last block's ReLU (pool5's input), pooled to one L2-normalised vector.

    Takes normalised images of any size, shape=(B, 3, H, W) float; returns float32 shape=(B, C): C = 256 for
    AlexNet, 512 for VGG16. Pooling runs in float32 (GeM's cube is too coarse in bfloat16).
    poolings: normally the one; several give their vectors side by side, shape=(B, C * len(poolings)), each
    L2-normalised, from one pass through the body (the descriptor benchmark compares them so)."""

    def __init__(self, features: nn.Sequential, pooling: str):
        super().__init__()
        assert isinstance(features[-1], nn.MaxPool2d), "features should end with pool5"
        assert pooling in POOLINGS, f"unknown pooling {pooling!r}"
        self.body = features[:-1]                                  # pool5 left out: its input is pooled
        self.poolings: tuple[str, ...] = (pooling,)
        self.channels = conv_channels(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.body(x).float()                                # (B, 3, H, W) -> (B, C, h, w), e.g. 13 x 13
        return torch.cat([F.normalize(POOLINGS[p](maps), dim=1, eps=EPS) for p in self.poolings], dim=1)   # -> (B, C)

    def extra_repr(self) -> str:
        return f"poolings={self.poolings}"


def conv_channels(features: nn.Sequential) -> int:
    """Output channels of the last convolution in features."""
    return [m for m in features.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def pooled_conv(net: nn.Module, layer: str) -> PooledConv:
    """A torchvision AlexNet or VGG16 (net) cut for a pooled layer ("conv5-gem")."""
    assert is_pooled(layer), f"not a pooled layer: {layer!r}"
    return PooledConv(net.features, layer.partition("-")[2])


def view_transforms(views: str) -> list[tuple[bool, float]]:
    """The views a descriptor is averaged over: (mirrored, scale) each."""
    assert views in VIEWS, f"unknown views {views!r}; choose one of {', '.join(VIEWS)}"
    if views == "single":
        return [(False, 1.0)]
    scales = SCALES if views == "flip+scales" else (1.0,)
    return [(mirrored, s) for s in scales for mirrored in (False, True)]


def largest_scale(views: str) -> float:
    return max(s for _, s in view_transforms(views))


class ViewAverage(nn.Module):
    """A descriptor network run on several views of each image (mirrored, rescaled on the device) and averaged.

    The mirror of a mirror is the image itself, so with "flip" an image and its mirror get the same descriptor.
    Takes normalised images shape=(B, 3, H, W); returns what net returns, averaged over the views, shape=(B, D)."""

    def __init__(self, net: nn.Module, views: str):
        super().__init__()
        self.net, self.views = net, views
        self.transforms = view_transforms(views)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for scale in dict.fromkeys(s for _, s in self.transforms):
            # mirrored, then rescaled: a mirror's views are then exactly the image's (resizing is not bit-exact
            # under a mirror), so an image and its mirror get the same descriptor
            views = [_rescaled(torch.flip(x, dims=(3,)) if mirrored else x, scale)
                     for mirrored, s in self.transforms if s == scale]
            if len(x) <= ONE_PASS_MAX_IMAGES:   # a query, a server's micro-batch: the views of a scale in one pass
                outs = self.net(torch.cat(views).contiguous(memory_format=torch.channels_last)).float()
                out = outs.view(len(views), len(x), -1).sum(dim=0)                        # (V * B, D) -> (B, D)
            else:                               # an indexing batch: one pass per view (the memory of one)
                out = sum(self.net(view.contiguous(memory_format=torch.channels_last)).float() for view in views)
            total = out if total is None else total + out
        return total / len(self.transforms)

    def extra_repr(self) -> str:
        return f"views={self.views}"


def _rescaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return x
    size = [max(1, round(d * scale)) for d in x.shape[2:]]
    # in float32: a bf16 network's input is bf16, which the antialiased resize has no kernel for
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=scale < 1.0).to(x.dtype)


def with_views(net: nn.Module, views: str) -> nn.Module:
    """net itself for a single view, else net averaged over the views."""
    return net if views == "single" else ViewAverage(net, views)
