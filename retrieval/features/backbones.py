"""The feature extractor over a backbone (torchvision's AlexNet and VGG16, as features/architectures.py defines them;
their weights loaded by features/state_dicts.py, which this module's callers may import from here too): fc6/fc7, or
the last conv block pooled, each optionally averaged over views (features/descriptors.py), on a device, in a precision."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from retrieval.features.descriptors import is_pooled, largest_scale, pooled_conv, with_views
from retrieval.features.precision import (PRECISIONS, bf16_faster, cpu_bf16_instructions, probe_cache_file, probe_key,
                                          remember_bf16, remembered_bf16)
from retrieval.features.state_dicts import (  # noqa: F401 - the loading API, imported from here by its callers
    MODELS, imagenet_cache_path, load_backbone, load_state_dict, random_state_dict)
from retrieval.features.weights import WeightsChoice, WeightsUnavailable
from retrieval.images.decode import Preprocessing
from retrieval.names import DEFAULT_RANDOM_SEED, INPUT_NORMS, LAYERS, POOLED_INPUT, VIEWS, is_device_name
from retrieval.names import random_weights_file  # noqa: F401 - imported from here by its callers

log = logging.getLogger(__name__)


class DeviceUnavailable(RuntimeError):
    """The requested device (a CUDA GPU) is not there."""


def preprocessing_for(model: str, layer: str = "fc7", input_norm: str = "weights") -> Preprocessing:
    """Preprocessing from the ImageNet weights' own transforms (used for every weights choice). A pooled layer
    takes the centre square of the whole shorter side (POOLED_INPUT) instead of the 224 cut from 256: it needs no
    fixed input size, and keeps more of the picture. input_norm: retrieval.names.INPUT_NORMS."""
    assert input_norm in INPUT_NORMS, f"unknown input normalisation {input_norm!r}"
    t = MODELS[model].imagenet
    resize, crop = (POOLED_INPUT, POOLED_INPUT) if is_pooled(layer) else (t.resize_size, t.crop_size)
    return Preprocessing(resize_size=resize, crop_size=crop, mean=tuple(t.mean), std=tuple(t.std),
                         input_norm=input_norm)


def resolve_device(device: str) -> torch.device:
    """"cpu", "cuda" (or "cuda:N") or "auto" -> the torch device. Raises DeviceUnavailable for a GPU that is not
    here, ValueError for another name (torch's own message lists a dozen backends this project does not run on)."""
    if not is_device_name(device):
        raise ValueError(f"device is 'cpu', 'cuda' (or 'cuda:N') or 'auto', not {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailable("a CUDA GPU was asked for, but PyTorch sees none here")
    return torch.device(device)


_PROBED: dict[tuple[str, str, str], tuple[bool, dict]] = {}   # (model, layer, views) -> auto's CPU probe, once per process


class FeatureExtractor:
    """A backbone cut at fc6/fc7 (after its ReLU) or at its last conv block, pooled (retrieval.names.LAYERS), in
    eval mode, on one device; views: the descriptor of the image alone, or averaged over its mirror (and scales);
    input_norm: the input normalised by the weights' mean and std, or by each image's own (Preprocessing).

    Call it with uint8 images, shape=(B, 3, 224, 224), on the CPU or already on the device; get float32
    features, shape=(B, D), on the CPU. Normalisation and dtype conversion happen on the device. precision:
    "fp32"; "bf16": autocast on CUDA, bfloat16 weights on a CPU with bf16 units (refused on other CPUs); "auto": bf16
    on CUDA, on a CPU with bf16 units whichever a start-up probe (one image each way) finds faster, else fp32.
    self.precision is the one chosen ("fp32" or "bf16"), as the catalog records it.
    """

    def __init__(self, model: str, layer: str, state_dict: dict[str, torch.Tensor], device: torch.device,
                 precision: str = "auto", views: str = "single", input_norm: str = "weights"):
        assert model in MODELS, f"unknown model {model!r}"
        assert layer in LAYERS, f"unknown layer {layer!r}"
        assert views in VIEWS, f"unknown views {views!r}"
        self.model, self.layer, self.views, self.device = model, layer, views, device
        self.preprocessing = preprocessing_for(model, layer, input_norm)
        self.largest_input = round(self.preprocessing.crop_size * largest_scale(views))   # side of the largest view
        self.probe: dict | None = None   # auto on a CPU with bf16 units: the start-up probe's medians, ms
        precision = resolve_precision(precision, device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True   # batches keep one shape: cuDNN's fastest convolution, found once
        if device.type == "cuda" or precision == "fp32":
            self.net, self.dim = _network(model, layer, views, state_dict, device)   # bf16 on CUDA: autocast in __call__
        elif precision == "bf16":
            self.net, self.dim = _network(model, layer, views, _bf16(state_dict), device)
        else:   # auto on a CPU with bf16 units: whichever of the two is faster here, timed on one image
            key = (model, layer, views)
            machine_key = probe_key("/".join(key), torch.__version__, torch.get_num_threads())
            if key not in _PROBED and (remembered := remembered_bf16(machine_key)) is not None:
                _PROBED[key] = True, remembered      # probed on this machine before: bf16, no need to time it again
            if key in _PROBED:
                faster, self.probe = _PROBED[key]
                self.net, self.dim = _network(model, layer, views, _bf16(state_dict) if faster else state_dict, device)
            else:
                (fp32_net, self.dim), (bf16_net, _) = (_network(model, layer, views, state_dict, device),
                                                       _network(model, layer, views, _bf16(state_dict), device))
                one = torch.zeros(1, 3, self.preprocessing.crop_size, self.preprocessing.crop_size)
                one = one.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode():
                    faster, self.probe = _PROBED[key] = bf16_faster(lambda: fp32_net(one),
                                                                    lambda: bf16_net(one.to(torch.bfloat16)))
                self.net = bf16_net if faster else fp32_net
                if faster:
                    remember_bf16(machine_key, self.probe)
            precision = "bf16" if faster else "fp32"
            log.info("precision auto: %s on this CPU (%s; one image: fp32 %.1f ms, bf16 %.1f ms%s)", precision,
                     cpu_bf16_instructions(), self.probe["fp32_ms"], self.probe["bf16_ms"],
                     f"; probed {self.probe['probed']}, remembered in {probe_cache_file()}" if "probed" in self.probe
                     else "")
        self.precision = precision

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.dtype == torch.uint8 and pixels.ndim == 4, f"want uint8 (B,3,H,W), got {pixels.dtype} {tuple(pixels.shape)}"
        x = pixels.to(self.device, non_blocking=True)
        x = self.preprocessing.normalise(x).contiguous(memory_format=torch.channels_last)   # (B, 3, 224, 224) float32
        if self.precision == "bf16" and self.device.type == "cuda":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                out = self.net(x)
        elif self.precision == "bf16":                                      # the CPU: bf16 weights, bf16 input
            out = self.net(x.to(torch.bfloat16))
        else:
            out = self.net(x)                                   # (B, 3, 224, 224) -> (B, 4096), or (B, 256|512)
        return out.float().cpu()


class PrecisionUnavailable(DeviceUnavailable):
    """The precision asked for does not run on this device."""


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision to run: "fp32", "bf16", or "auto" where only timing can tell (a CPU with bf16 units:
    FeatureExtractor probes). auto is bf16 on CUDA and fp32 on CPUs without bf16 instructions (AVX512-BF16,
    AMX-BF16), where bf16 is refused: PyTorch emulates it there, slower than fp32, for features that only lose
    accuracy."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        return "bf16" if precision == "auto" else precision
    if device.type == "cpu" and cpu_bf16_instructions():
        return precision
    if precision == "bf16":
        raise PrecisionUnavailable("this CPU has no bf16 instructions (AVX512-BF16 or AMX-BF16), so bf16 would run "
                                   "slower than fp32; use --precision fp32 (or auto)")
    return "fp32"


def precision_for_index(recorded: str | None, device: torch.device) -> str:
    """The precision to compute an index's queries (or its new vectors) in: the one its vectors were last computed
    in (the catalog's extraction record), so an indexed image finds itself at distance ~0, where this device runs
    it; else fp32 (bf16 on CUDA), as before precisions were recorded. recorded: "fp32", "bf16" or None."""
    if recorded in ("fp32", "bf16"):
        try:
            return resolve_precision(recorded, device)
        except PrecisionUnavailable:
            log.info("the index's vectors were computed in %s, which this device lacks: queries run in fp32 "
                     "(cosine about 0.999 to bf16 vectors)", recorded)
            return "fp32"
    return "bf16" if device.type == "cuda" else "fp32"


def _bf16(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict's floating-point tensors as bfloat16 (a copy: mapped float32 weights stay untouched)."""
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state_dict.items()}


def _network(model: str, layer: str, views: str, state_dict: dict[str, torch.Tensor],
             device: torch.device) -> tuple[nn.Module, int]:
    """model's backbone with state_dict's tensors (their dtype kept), cut at layer (or its last conv block pooled),
    averaged over views, in eval mode, on device -> (network, its output dimension).

    Raises WeightsUnavailable."""
    spec = MODELS[model]
    with torch.device("meta"):     # no random init of parameters we are about to replace
        net = spec.build()
    load_backbone(net, model, state_dict, assign=True)   # fc8 may be absent or another size: it is cut off below
    net.eval()
    body = pooled_conv(net, layer) if is_pooled(layer) else cut_at(net, spec.layers[layer])
    # fc6 and fc7 are both 4096-d; a pooled layer has one value per channel of the last conv (256 or 512)
    dim = body.channels if is_pooled(layer) else int(net.classifier[-1].in_features)
    # channels-last convolutions: faster on CUDA, and for batches on the CPU too (AlexNet, eight images on
    # the 2-core CI machine, interleaved A/B: 109 -> 92 ms; one image: no difference; outputs within 1e-7)
    out = with_views(body, views).eval().requires_grad_(False).to(device, memory_format=torch.channels_last)
    if device.type == "cpu" and onednn_linear_available() and next(out.parameters()).dtype == torch.float32:
        use_onednn_linear(out)   # bf16: PyTorch's own Linear is faster (one image: 13.2 against 15.7 ms)
    return out, dim


def onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDNNLinear(nn.Module):
    """nn.Linear on the CPU computed by oneDNN instead of the BLAS: the same float32 product, faster for few rows.

    PyTorch hands a CPU float32 Linear to MKL, whose GEMV/GEMM for a handful of input rows is slow on
    some CPUs (it runs on one core, and on AMD at well under memory speed). The fc layers are most of
    a small batch's time, since their weights (218 MB for AlexNet) are read whole for every forward
    pass. AlexNet on the 2-core AMD EPYC CI machine, medians: fc6 for one image 7.6 -> 6.2 ms, for eight
    14.9 -> 8.4 ms, for 64 35.8 -> 25.7 ms; the whole network for one image 20.2 -> 15.3 ms. Results
    agree with nn.Linear to 2e-6 (float32 summation order), the same as a change of thread count.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias      # the same Parameters: state dict unchanged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")   # (B, in) -> (B, out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def use_onednn_linear(net: nn.Module) -> None:
    """Swap every nn.Linear in net for a OneDNNLinear sharing its weights (CPU, inference only)."""
    for module in list(net.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, OneDNNLinear(child))


def cut_at(net: nn.Module, node: str) -> nn.Sequential:
    """The network up to and including the named classifier node ("classifier.5"), as a plain Sequential.

    Same computation as torchvision's create_feature_extractor(net, {node: ...}) for these
    architectures, without torch.fx tracing, which patches nn.Module.__call__ process-wide and so
    can break forward passes running in other threads while a network is built.
    """
    prefix, _, index = node.partition(".")
    assert prefix == "classifier" and index.isdigit(), f"feature node must be classifier.N, not {node!r}"
    return nn.Sequential(net.features, net.avgpool, nn.Flatten(1),      # (B, 3, 224, 224) -> (B, 9216 or 25088)
                         net.classifier[:int(index) + 1])               # -> (B, 4096) after the ReLU


def build_extractor(model: str, layer: str, weights: WeightsChoice | str, index_dir: Path | None, device: str = "auto", *,
                    seed: int = DEFAULT_RANDOM_SEED, create: bool = False,
                    precision: str = "auto", views: str = "single",
                    input_norm: str = "weights") -> tuple[FeatureExtractor, str]:
    """-> (extractor, weights identity)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    torch_device = resolve_device(device)
    resolve_precision(precision, torch_device)    # refused before the weights are loaded
    state, identity = load_state_dict(model, weights, index_dir, seed=seed, create=create)
    return FeatureExtractor(model, layer, state, torch_device, precision, views, input_norm), identity
