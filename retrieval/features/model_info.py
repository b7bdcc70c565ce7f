"""Per-layer tables of a backbone (output shapes, activations, memory, weights) and its first-layer filters as a PNG."""
from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import torch
from PIL import Image
from torch import nn

from retrieval.features.architectures import VGG
from retrieval.features.backbones import MODELS
from retrieval.reports.filters import filter_grid

BYTES_PER_VALUE = 4   # fp32
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One row of the table: a conv, pool or fully connected layer with its ReLU/dropout folded in."""
    name: str                  # conventional name: "input", "conv1_1", "pool1", "fc6", ...
    kind: str                  # the classic label: "INPUT", "CONV3-64", "POOL2", "FC-4096"
    module: str                # torchvision module path ("features.0"); "" for the input
    shape: tuple[int, ...]     # output per image, (C, H, W) or (C,)
    activations: int           # output values per image
    weights: int               # parameters other than biases
    biases: int

    @property
    def params(self) -> int:
        return self.weights + self.biases

    @property
    def memory_bytes(self) -> int:
        """Memory of the output at fp32, per image."""
        return self.activations * BYTES_PER_VALUE

    @property
    def shape_text(self) -> str:
        """The classic [HxWxC] notation; fully connected outputs read [1x1xC]."""
        c, h, w = (self.shape[0], 1, 1) if len(self.shape) == 1 else self.shape
        return f"[{h}x{w}x{c}]"

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "module": self.module, "shape": list(self.shape),
                "shape_text": self.shape_text, "activations": self.activations, "memory_bytes": self.memory_bytes,
                "weights": self.weights, "biases": self.biases, "params": self.params}


@dataclasses.dataclass(frozen=True)
class LayerTable:
    """The per-layer table of one network at one input size; totals are the sums of the rows."""
    model: str
    input_size: int
    rows: list[LayerRow]

    @property
    def activations(self) -> int:
        """Values per image, the input included."""
        return sum(r.activations for r in self.rows)

    @property
    def weights(self) -> int:
        return sum(r.weights for r in self.rows)

    @property
    def biases(self) -> int:
        return sum(r.biases for r in self.rows)

    @property
    def params(self) -> int:
        return self.weights + self.biases

    @property
    def forward_bytes(self) -> int:
        """Memory of every activation of one image at fp32 (what the classic table sums; an upper bound for inference)."""
        return self.activations * BYTES_PER_VALUE

    @property
    def backward_bytes(self) -> int:
        """About twice the forward memory: each activation also gets a gradient."""
        return 2 * self.forward_bytes

    @property
    def param_bytes(self) -> int:
        return self.params * BYTES_PER_VALUE

    def row(self, name: str) -> LayerRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no layer {name!r} in the {self.model} table")

    def to_json(self) -> dict:
        return {"model": self.model, "input_size": self.input_size, "bytes_per_value": BYTES_PER_VALUE,
                "layers": [r.to_json() for r in self.rows],
                "totals": {"activations": self.activations, "forward_bytes": self.forward_bytes,
                           "backward_bytes": self.backward_bytes, "weights": self.weights, "biases": self.biases,
                           "params": self.params, "param_bytes": self.param_bytes}}


def build_shape_model(model: str) -> nn.Module:
    """The torchvision network with its parameters on the meta device: real shapes, no memory, no weights, no download."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    with torch.device("meta"):
        return MODELS[model].build().eval()


def layer_table(model: str | nn.Module, input_size: int = 224) -> LayerTable:
    """Trace one image through the real network with forward hooks and tabulate each layer.

    model: a name in MODELS (the network is built on the meta device: nothing is computed or
    downloaded) or a module (an image of zeros runs through it on its own device).
    Conv, pool and linear layers each get a row; shape-preserving layers (ReLU, dropout, an adaptive
    pool that changes nothing) are folded into the row before them, as the classic table does.
    Raises ValueError when input_size is too small for the network.
    """
    if input_size < 1:
        raise ValueError(f"input size must be positive, not {input_size}")
    if isinstance(model, str):
        name, net = model, build_shape_model(model)
    else:
        net = model
        name = type(net).__name__.lower()
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")

    calls: list[tuple[str, nn.Module, tuple[int, ...], tuple[int, ...]]] = []   # (path, module, in, out) per image
    names = {m: n for n, m in net.named_modules()}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        calls.append((names[module], module, tuple(inputs[0].shape[1:]), tuple(output.shape[1:])))

    leaves = [m for m in net.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.inference_mode():
            net(torch.zeros(1, 3, input_size, input_size, device=device))
    except RuntimeError as exc:
        raise ValueError(f"{name} cannot take a {input_size}x{input_size} input: {exc}") from exc
    finally:
        for h in handles:
            h.remove()

    rows = [LayerRow("input", "INPUT", "", (3, input_size, input_size), 3 * input_size * input_size, 0, 0)]
    for path, module, in_shape, out_shape in calls:
        weights = sum(p.numel() for n, p in module.named_parameters(recurse=False) if n != "bias")
        biases = sum(p.numel() for n, p in module.named_parameters(recurse=False) if n == "bias")
        kind = _kind(module)
        if kind is None or (isinstance(module, POOLS) and out_shape == in_shape):
            # folded: ReLU, dropout, an identity pool (its parameters, if any, count with the row before)
            assert out_shape == in_shape, f"{path} ({type(module).__name__}) changes the shape but has no row"
            prev = rows[-1]
            rows[-1] = dataclasses.replace(prev, weights=prev.weights + weights, biases=prev.biases + biases)
            continue
        rows.append(LayerRow("", kind, path, out_shape, math.prod(out_shape), weights, biases))
    staged = isinstance(net, VGG)
    return LayerTable(name, input_size, _with_conventional_names(rows, staged))


def _kind(module: nn.Module) -> str | None:
    """The classic label of a layer that gets its own row; None for shape-preserving layers that fold in."""
    if isinstance(module, nn.Conv2d):
        return f"CONV{module.kernel_size[0]}-{module.out_channels}"
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        k = module.kernel_size
        return f"POOL{k if isinstance(k, int) else k[0]}"
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return "AVGPOOL"
    if isinstance(module, nn.AdaptiveMaxPool2d):
        return "MAXPOOL"
    if isinstance(module, nn.Linear):
        return f"FC-{module.out_features}"
    if isinstance(module, (nn.ReLU, nn.Dropout, nn.Identity)):
        return None
    return type(module).__name__.upper()


def _with_conventional_names(rows: list[LayerRow], staged: bool) -> list[LayerRow]:
    """Name rows as the papers do: VGG conv1_1 .. conv5_3 with pool1 .. pool5; AlexNet conv1 .. conv5 with
    pool1, pool2, pool5 (named after the conv before them); then fc6, fc7, fc8 for both."""
    out, stage, in_stage, convs, fcs, others = [], 1, 0, 0, 0, 0
    for r in rows:
        if r.kind == "INPUT":
            name = "input"
        elif r.kind.startswith("CONV"):
            convs += 1
            in_stage += 1
            name = f"conv{stage}_{in_stage}" if staged else f"conv{convs}"
        elif r.kind in ("AVGPOOL", "MAXPOOL"):          # torchvision's adaptive pool, when it resizes
            name = r.kind.lower()
        elif r.kind.startswith("POOL"):
            name = f"pool{stage if staged else convs}"
            stage, in_stage = stage + 1, 0
        elif r.kind.startswith("FC"):
            fcs += 1
            last = (stage - 1 if in_stage == 0 else stage) if staged else convs
            name = f"fc{last + fcs}"
        else:
            others += 1
            name = f"{r.kind.lower()}{others}"
        out.append(dataclasses.replace(r, name=name))
    return out


def per_image_activation_bytes(model: str | nn.Module, input_size: int = 224) -> int:
    """Forward memory of one image at fp32: the sum of all activations of the table (input included).

    An upper bound for inference, where PyTorch frees each activation once the next layer has used it.
    """
    return layer_table(model, input_size).forward_bytes


# --- first-layer filters --------------------------------------------------------------------------

def first_conv_weight(net: nn.Module | dict[str, torch.Tensor]) -> torch.Tensor:
    """The first convolution's filters, float32 on the CPU, shape=(out_channels, in_channels, kh, kw).

    net: a module (the first nn.Conv2d in registration order, which is forward order for AlexNet and
    VGG16, also after create_feature_extractor) or a state dict (the first 4-d weight).
    """
    if isinstance(net, nn.Module):
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                return m.weight.detach().float().cpu()
        raise ValueError("the network has no convolution layer")
    for key, t in net.items():
        if key.endswith("weight") and t.ndim == 4:
            return t.detach().float().cpu()
    raise ValueError("the state dict has no convolution weight")


def filters_png(net: nn.Module | dict[str, torch.Tensor] | torch.Tensor, *, cell: int = 48, padding: int = 2,
                columns: int | None = None, background: int = 255) -> bytes:
    """The first convolution layer's filters as a PNG image grid: each filter rescaled to 0..255 on its own (a constant
    one mid-grey) and enlarged, nearest neighbour, to about `cell` pixels (retrieval.reports.filters.filter_grid)."""
    weight = net if isinstance(net, torch.Tensor) else first_conv_weight(net)
    grid = filter_grid(weight, cell=cell, padding=padding, columns=columns, dtype=np.uint8, background=background)
    buf = io.BytesIO()
    Image.fromarray(grid, "RGB").save(buf, "PNG")
    return buf.getvalue()
