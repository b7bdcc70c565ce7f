"""The child processes of `bench_index.py --device`, and how they are run and watched.

Each child prints one JSON line: the machine (info), the seeded random weights (weights), the reader stage alone
(decode), the network alone (network). run_child runs one and samples the GPU meanwhile (GpuSampler, NVML).
Run as `index_probes.py CHILD PARAMS_JSON`.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class MeasurementError(RuntimeError):
    """One measurement failed (its process exited non-zero, timed out, or printed no result)."""


class GpuSampler:
    """GPU 0's utilisation (%) and memory in use, read by NVML every `interval` s in a thread while in the block.

    stats() is None where pynvml or an NVIDIA GPU is missing."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.samples: list[tuple[int, int]] = []       # (utilisation %, memory used bytes)
        self.total_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = self._handle = None

    def __enter__(self) -> "GpuSampler":
        try:
            import pynvml
        except ImportError:
            return self
        try:
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.total_bytes = int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).total)
        except pynvml.NVMLError:
            return self
        self._nvml = pynvml
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        nvml = self._nvml
        while not self._stop.is_set():
            try:
                util = nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
                used = nvml.nvmlDeviceGetMemoryInfo(self._handle).used
                self.samples.append((int(util), int(used)))
            except nvml.NVMLError:
                pass
            self._stop.wait(self.interval)

    def __exit__(self, *exc_info) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass

    def stats(self) -> dict | None:
        """mean/median/max utilisation over all samples, and over the busy window (first to last sample above 0 %,
        which leaves out start-up and teardown); peak memory in use. None without NVML."""
        if self._nvml is None:
            return None
        util = [u for u, _ in self.samples]
        busy = [i for i, u in enumerate(util) if u > 0]
        window = util[busy[0]:busy[-1] + 1] if busy else []
        mb = 2**20
        return {
            "samples": len(util), "interval_s": self.interval,
            "util_mean": round(statistics.fmean(util), 1) if util else None,
            "util_median": statistics.median(util) if util else None,
            "util_max": max(util) if util else None,
            "util_mean_busy_window": round(statistics.fmean(window), 1) if window else None,
            "busy_window_s": round(len(window) * self.interval, 1),
            "memory_used_max_mb": round(max(m for _, m in self.samples) / mb) if self.samples else None,
            "memory_total_mb": round(self.total_bytes / mb) if self.total_bytes else None,
        }


def child_env() -> dict[str, str]:
    """The environment of every child: this checkout first on the import path (not an installed copy)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


def run_child(cmd: list[str], timeout: float | None, sample_gpu: bool = True) -> tuple[dict, float, dict | None]:
    """Run cmd, whose last stdout line is a JSON object; -> (that object, wall seconds, GPU samples' stats or None).

    Raises MeasurementError when it exits non-zero, runs past timeout, or prints no JSON."""
    started = time.perf_counter()
    with GpuSampler() if sample_gpu else contextlib.nullcontext() as sampler:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise MeasurementError(f"killed after {timeout:.0f} s (the time budget): {' '.join(cmd[:6])} ...") from None
        finally:
            if proc.poll() is None:     # past its time, or we were interrupted: the child goes with us
                proc.kill()
                proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise MeasurementError(f"exit status {proc.returncode}: {' '.join(cmd[:6])} ...\n{err.strip()[-2000:]}")
    lines = out.strip().splitlines()
    try:
        return json.loads(lines[-1]), wall, sampler.stats() if sample_gpu else None
    except (IndexError, json.JSONDecodeError):
        raise MeasurementError(f"no JSON result from {' '.join(cmd[:6])} ...: {out[-500:]!r} {err[-1500:]}") from None


def child_cmd(name: str, **params) -> list[str]:
    """The command that runs child `name` of this file with params (JSON)."""
    return [sys.executable, str(Path(__file__).resolve()), name, json.dumps(params)]


# --- the children: each prints one JSON line ----------------------------------------------------------

def precision_argument() -> bool:
    """Whether FeatureExtractor takes precision= ("fp32" | "bf16")."""
    import inspect

    from retrieval.features.backbones import FeatureExtractor

    return "precision" in inspect.signature(FeatureExtractor).parameters


def child_info(params: dict) -> dict:
    """The machine and the software: CPUs, memory, GPU, versions, and the modules index-images needs that are missing."""
    import importlib.util

    import numpy
    import PIL
    import psutil
    import torch
    import torchvision

    from retrieval.system import available_cores

    cuda = torch.cuda.is_available()
    info = {
        "cpus": os.cpu_count(), "available_cores": available_cores(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1), "python": platform.python_version(),
        "platform": platform.platform(), "processor": cpu_model(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__,
        "numpy": numpy.__version__, "cuda_available": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None, "gpu_count": torch.cuda.device_count() if cuda else 0,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "pynvml": importlib.util.find_spec("pynvml") is not None, "nvidia_driver": None,
        "missing_modules": [m for m in ("faiss", "sqlalchemy", "click", "tqdm", "flask", "gunicorn")
                            if importlib.util.find_spec(m) is None],
        "feature_extractor_precision_argument": precision_argument(),
    }
    if info["pynvml"]:
        import pynvml

        try:
            pynvml.nvmlInit()
            info["nvidia_driver"] = pynvml.nvmlSystemGetDriverVersion()
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:     # no NVIDIA driver here
            pass
    try:
        from indexer.config import default_workers   # needs sqlalchemy (the catalog)

        info["index_images_workers"] = default_workers(params.get("device", "auto"))
    except ImportError as exc:
        info["index_images_workers"] = None
        info["index_images_workers_error"] = str(exc)
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def child_weights(params: dict) -> dict:
    """The seeded random weights of each of params["models"], made once in params["work"]/weights-MODEL/;
    -> {model: {"file", "seconds"}} (the seconds to make or check it)."""
    from retrieval.features.backbones import load_state_dict, random_weights_file

    out = {}
    for model in params["models"]:
        started = time.perf_counter()
        folder = Path(params["work"]) / f"weights-{model}"
        folder.mkdir(parents=True, exist_ok=True)
        load_state_dict(model, "random", folder, create=True)
        out[model] = {"file": str(random_weights_file(folder, model)), "seconds": round(time.perf_counter() - started, 1)}
    return out


def child_decode(params: dict) -> dict:
    """The reader stage alone: every file of params["data"] decoded by Reader in params["workers"] processes, in
    batches of params["batch_size"] (pinned when params["pin_memory"]), no network; -> images, seconds, images/s."""
    import torch   # before the clock: batches are collated into tensors (index-images imports torch while decoding)

    from indexer.read import Reader
    from retrieval.images.decode import DEFAULT_MAX_PIXELS, Preprocessing
    from retrieval.images.scan import scan_folder

    data = Path(params["data"])
    files = scan_folder(data).images
    if params["pin_memory"]:
        torch.empty(1).pin_memory()    # the CUDA context, before the clock (index-images has it from the network)
    prep = Preprocessing()             # the ImageNet sizes, which both AlexNet and VGG16 use
    images = bad = 0
    started = time.perf_counter()
    on_device = params.get("device")   # "cuda": JPEGs inspected by the workers, decoded by nvJPEG (--decode device)
    decoder = None
    if on_device:
        from retrieval.images.device_decode import DeviceJpegDecoder

        decoder = DeviceJpegDecoder(prep, torch.device(on_device), max_pixels=DEFAULT_MAX_PIXELS)
        torch.zeros(1, device=on_device)   # the CUDA context, before the clock
    with Reader(data, files, workers=params["workers"], prep=prep, max_pixels=DEFAULT_MAX_PIXELS,
                device_share=1.0 if on_device else None) as reader:
        for batch in reader.read(prep, params["batch_size"], pin_memory=params["pin_memory"]):
            if decoder is not None and batch.jpegs:
                result = decoder.crops(batch.jpegs)                 # (n, 3, 224, 224) uint8 on the device
                bad += len(result.failed)
            images += len(batch.rows)
            bad += len(batch.bad)
        if on_device:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    if decoder is not None:
        decoder.close()
    return {"images": images, "bad": bad, "seconds": round(seconds, 3), "images_per_second": images / seconds,
            "workers": params["workers"], "pin_memory": params["pin_memory"], "batch_size": params["batch_size"],
            "decoded_on": on_device or "workers"}


def child_network(params: dict) -> dict:
    """The network alone: FeatureExtractor on uint8 (B, 3, 224, 224) batches already on the device, B as
    `--batch-size auto` picks, timed after warm-up for about params["seconds"] per precision; -> for each precision,
    images/s and the GPU's utilisation meanwhile."""
    import torch

    from retrieval.features.batch_size import resolve_batch_size
    from retrieval.features.backbones import FeatureExtractor

    device = torch.device(params["device"])
    state = torch.load(params["weights"], map_location="cpu", weights_only=True)
    has_precision = precision_argument()
    result: dict = {"precision_argument": has_precision}
    for precision in (("fp32", "bf16") if device.type == "cuda" else ("fp32",)):
        extractor = FeatureExtractor(params["model"], "fc7", state, device,
                                     **({"precision": precision} if has_precision else {}))
        batch = resolve_batch_size("auto", extractor)
        crop = extractor.preprocessing.crop_size
        pixels = torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8, device=device)  # (B, 3, 224, 224)
        forward, how = forward_at(extractor, precision, has_precision)
        result[precision] = {**time_forward(forward, pixels, device, params["seconds"]), "batch_size": batch,
                             "how": how}
        del extractor, pixels, forward   # the next precision's batch size is chosen with this one's memory free
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["batch_size"] = result["fp32"]["batch_size"]
    return result


def forward_at(extractor, precision: str, has_precision: bool) -> tuple[Callable, str]:  # noqa: ANN001 - FeatureExtractor
    """-> (a function of a uint8 batch on the device, what it is). The extractor's own call where it can run at this
    precision; without a precision argument on CUDA it always autocasts to bf16, so fp32 is its network called
    without autocast (the same normalisation, channels-last layout and copy of the features to the CPU)."""
    import torch

    if has_precision:
        return extractor, f"FeatureExtractor(precision={precision!r})"
    if extractor.device.type != "cuda" or precision == "bf16":
        return extractor, ("FeatureExtractor as it is (bf16 autocast on CUDA)" if extractor.device.type == "cuda"
                           else "FeatureExtractor as it is (fp32 on the CPU)")

    @torch.inference_mode()
    def fp32(pixels: torch.Tensor) -> torch.Tensor:
        x = extractor.preprocessing.normalise(pixels).contiguous(memory_format=torch.channels_last)  # (B, 3, 224, 224)
        return extractor.net(x).float().cpu()                                                          # (B, 4096)

    return fp32, "extractor.net without autocast (FeatureExtractor has no precision argument)"


def time_forward(forward: Callable, pixels, device, seconds: float, min_iterations: int = 3) -> dict:  # noqa: ANN001
    """Warm up, then call forward(pixels) until `seconds` have passed (and at least min_iterations times)."""
    import torch

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3 if cuda else 1):      # cuDNN's algorithm choice, lazy kernel loading, the allocator's pools
        forward(pixels)
    sync()
    iterations = 0
    with GpuSampler() as sampler:
        started = time.perf_counter()
        while iterations < min_iterations or time.perf_counter() - started < seconds:
            forward(pixels)                 # features come back to the CPU: each call waits for its batch
            iterations += 1
        sync()
        elapsed = time.perf_counter() - started
    return {"iterations": iterations, "seconds": round(elapsed, 3),
            "images_per_second": iterations * len(pixels) / elapsed, "gpu": sampler.stats()}


CHILDREN = {"info": child_info, "weights": child_weights, "decode": child_decode, "network": child_network}




if __name__ == "__main__":
    name, params = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(CHILDREN[name](params)))
