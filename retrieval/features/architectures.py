"""AlexNet and VGG16 exactly as torchvision defines them (the same modules, names, shapes and seeded
initialisation, so the same state dicts), and their ImageNet weights' address and transforms, without importing
torchvision.

Why: `import torchvision` imports every model and torchvision.ops, whose roi_align imports torch._dynamo: 1.7 s
of a 4.5 s index-images run on 120 photos (2-core AMD EPYC, idle), paid again by every search-images and every
serve-images worker. These two networks are a few layers each; tests/test_networks_match_torchvision.py checks them against
torchvision's own (state dict keys and shapes, seeded initial values bit for bit, outputs, ImageNet metadata), so
a torchvision that changed them would fail there. torchvision is still what decodes JPEGs on a GPU
(retrieval.images.device_decode) and what the benchmarks' naive programs use.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

# torchvision.models.vgg.cfgs["D"]: channels of each 3x3 convolution, "M" a 2x2 max pool
VGG16_LAYERS: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                       512, 512, 512, "M")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class AlexNet(nn.Module):
    """torchvision.models.AlexNet ("One weird trick" variant): five convolutions, three fully connected layers."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(        # fc6 = classifier.1, fc7 = classifier.4, fc8 = classifier.6
            nn.Dropout(p=dropout), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(p=dropout), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, num_classes) logits."""
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class VGG(nn.Module):
    """torchvision.models.VGG without batch normalisation, with its own initialisation (Kaiming-normal
    convolutions, N(0, 0.01) linear layers, zero biases)."""

    def __init__(self, layers: tuple[int | str, ...] = VGG16_LAYERS, num_classes: int = 1000,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.features = _vgg_features(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(        # fc6 = classifier.0, fc7 = classifier.3, fc8 = classifier.6
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        for m in self.modules():    # in torchvision's order, so a seed draws the same numbers
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, num_classes) logits."""
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _vgg_features(layers: tuple[int | str, ...]) -> nn.Sequential:
    modules: list[nn.Module] = []
    channels = 3
    for v in layers:
        if v == "M":
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            modules += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = int(v)
    return nn.Sequential(*modules)


def alexnet() -> AlexNet:
    return AlexNet()


def vgg16() -> VGG:
    return VGG(VGG16_LAYERS)


@dataclasses.dataclass(frozen=True)
class ImageNetWeights:
    """A network's ImageNet weights as torchvision publishes them: where they are downloaded from, their name (what
    an index records), and the transform they were trained with (resize the shorter side, centre-crop, normalise)."""
    name: str              # torchvision's enum member, e.g. "AlexNet_Weights.IMAGENET1K_V1"
    url: str
    num_params: int
    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def get_state_dict(self, *, progress: bool, check_hash: bool) -> dict[str, torch.Tensor]:
        """Downloaded into torch hub's cache (or read from it), as torchvision's Weights.get_state_dict does."""
        return torch.hub.load_state_dict_from_url(self.url, progress=progress, check_hash=check_hash)


ALEXNET_IMAGENET = ImageNetWeights("AlexNet_Weights.IMAGENET1K_V1",
                                   "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", 61_100_840)
VGG16_IMAGENET = ImageNetWeights("VGG16_Weights.IMAGENET1K_V1",
                                 "https://download.pytorch.org/models/vgg16-397923af.pth", 138_357_544)
