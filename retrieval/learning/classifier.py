"""The network a fine-tune trains: a torchvision backbone with a new classification head, in a convolutional and a fully connected part."""
from __future__ import annotations

import torch
from torch import nn

from retrieval.features.backbones import MODELS, load_backbone


class Classifier(nn.Module):
    """A torchvision backbone with a new last layer for the collection's classes, in two parts.

    conv: features -> avgpool -> flatten, (B, 3, 224, 224) float -> (B, 9216) AlexNet or (B, 25088) VGG16.
    fc: the rest of the classifier (fc6, fc7 and their ReLUs and dropouts) and the new head, -> (B, C) logits;
    to_fc7 is its first part (up to fc7's ReLU, the layer index-images stores) and after_fc7 the rest.
    `net` is the torchvision module itself (its state dict has torchvision's key names).
    """

    def __init__(self, model: str, state_dict: dict[str, torch.Tensor], num_classes: int, seed: int,
                 dropout: float | None = None):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = MODELS[model].build()
            load_backbone(net, model, state_dict)
            old = net.classifier[-1]
            head = nn.Linear(old.in_features, num_classes)
            nn.init.normal_(head.weight, 0.0, 0.01)   # small logits: the initial loss starts at chance, ln(C)
            nn.init.zeros_(head.bias)
        net.classifier[-1] = head
        for layer in net.classifier:
            if isinstance(layer, nn.Dropout) and dropout is not None:
                layer.p = dropout
        self.dropout = next(layer.p for layer in net.classifier if isinstance(layer, nn.Dropout))
        self.net, self.model = net, model
        self.conv = nn.Sequential(net.features, net.avgpool, nn.Flatten(1))
        self.fc = net.classifier
        fc7_relu = int(MODELS[model].layers["fc7"].split(".")[1])      # "classifier.5" -> 5
        self.to_fc7, self.after_fc7 = self.fc[:fc7_relu + 1], self.fc[fc7_relu + 1:]

    @property
    def head(self) -> nn.Linear:
        return self.net.classifier[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))                       # (B, 3, 224, 224) -> (B, D) -> (B, C)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from either input a batch can be: cached convolutional output (B, D) or images (B, 3, 224, 224)."""
        return self.fc(x) if x.ndim == 2 else self(x)

    def fc7_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fc7 after its ReLU, shape=(B, 4096); logits, shape=(B, C)) from cached convolutional output or images."""
        fc7 = self.to_fc7(x if x.ndim == 2 else self.conv(x))         # (B, D) -> (B, 4096)
        return fc7, self.after_fc7(fc7)                                # (B, 4096) -> (B, C)

    def set_trainable(self, mode: str) -> list[nn.Parameter]:
        """requires_grad for the layers `mode` trains, off for the others; -> the trained parameters."""
        self.requires_grad_(mode == "all")
        if mode == "head":
            self.head.requires_grad_(True)
        elif mode == "fc":
            self.fc.requires_grad_(True)
        return [p for p in self.parameters() if p.requires_grad]

    def train_mode(self, mode: str) -> None:
        """Dropout on where layers train (the frozen fc layers of `head` run as at inference)."""
        self.train(mode in ("fc", "all"))
        if mode == "head":
            self.head.train()

    def backbone_state(self, keep_head: bool) -> dict[str, torch.Tensor]:
        """The torchvision state dict on the CPU, without the head ("classifier.6.*") unless keep_head."""
        head = f"classifier.{len(self.net.classifier) - 1}."
        return {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()
                if keep_head or not k.startswith(head)}
