"""`--batch-size auto`: the batch that fits the free GPU memory, from the network's per-image activation memory."""
from __future__ import annotations

import dataclasses
import logging

import torch

from retrieval.features.backbones import FeatureExtractor
from retrieval.features.model_info import per_image_activation_bytes

log = logging.getLogger(__name__)

AUTO = "auto"
CPU_BATCH = 32          # on the CPU memory is not what limits the batch; 32 keeps the cores busy
MAX_AUTO_BATCH = 512    # beyond this a GPU gains nothing and a crash would redo a larger transaction
SAFETY_MARGIN = 0.25    # share of the free memory left alone (allocator fragmentation, cuDNN workspaces, other processes)


@dataclasses.dataclass(frozen=True)
class BatchChoice:
    batch_size: int
    reason: str         # one sentence for the log: the numbers that gave batch_size


def choose_batch_size(model: str, device: torch.device | str, free_bytes: int | None, weight_bytes: int, *,
                      margin: float = SAFETY_MARGIN, input_size: int = 224, max_batch: int = MAX_AUTO_BATCH,
                      cpu_batch: int = CPU_BATCH) -> BatchChoice:
    """Pick the batch size for `--batch-size auto`.

    On CUDA: (free_bytes x (1 - margin) - weight_bytes) / per-image forward memory, clamped to
    1..max_batch. The per-image memory is the sum of all activations of the model's layer table at
    fp32 (retrieval.features.model_info), an upper bound for inference (bf16 autocast needs about half).
    free_bytes: device memory free before the network is loaded; weight_bytes: what the network
    needs on the device (weights and their half-precision copies). On the CPU: cpu_batch.
    """
    assert 0.0 <= margin < 1.0, f"margin is a share of the free memory, not {margin}"
    device = torch.device(device)
    if device.type != "cuda":
        return BatchChoice(cpu_batch, f"on the CPU auto uses {cpu_batch} images per batch (memory is not the limit there)")
    assert free_bytes is not None, "free_bytes is needed on CUDA"
    per_image = per_image_activation_bytes(model, input_size)
    usable = free_bytes * (1.0 - margin) - weight_bytes
    fits = int(usable // per_image) if usable > 0 else 0
    size = max(1, min(max_batch, fits))
    why = (f"{_gb(free_bytes)} free on {device}, keeping {margin:.0%} in reserve and {_gb(weight_bytes)} for the "
           f"weights leaves {_gb(max(usable, 0))}; {model} at {input_size}x{input_size} needs at most "
           f"{per_image / 1e6:.1f} MB per image forward (fp32 activations), so {fits} images fit")
    if fits > max_batch:
        why += f"; capped at {max_batch}"
    elif fits < 1:
        why += "; using 1 (expect out-of-memory retries: free some GPU memory)"
    return BatchChoice(size, why)


def cuda_free_bytes(device: torch.device) -> int:
    """Memory PyTorch can still get on this GPU: free in the driver plus cached but unused blocks."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def resolve_batch_size(requested: int | str | None, extractor: FeatureExtractor) -> int:
    """A number stays as asked; "auto" (or None) is chosen for the extractor's device and logged with the reason."""
    if requested is not None and requested != AUTO:
        assert isinstance(requested, int) and requested >= 1, \
            f"batch size must be a positive int or 'auto', not {requested!r}"
        return requested
    device = extractor.device
    free = weight_bytes = None
    if device.type == "cuda":
        resident = sum(t.numel() * t.element_size()
                       for t in [*extractor.net.parameters(), *extractor.net.buffers()])
        free = cuda_free_bytes(device) + resident          # as if the weights were not loaded yet
        weight_bytes = resident + resident // 2            # fp32 weights + their bf16 autocast copies
    choice = choose_batch_size(extractor.model, device, free, weight_bytes or 0,
                               input_size=extractor.largest_input)   # flip+scales: its largest view
    # a line on a GPU, where free memory decided; on the CPU the batch is always the same (the run's summary says it)
    log.log(logging.INFO if device.type == "cuda" else logging.DEBUG, "--batch-size auto chose %d: %s",
            choice.batch_size, choice.reason)
    return choice.batch_size


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"
