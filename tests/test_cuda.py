"""On a CUDA GPU, for real: bf16 GPU features against CPU fp32 ones of the same weights, `--batch-size auto`, a real
out-of-memory batch retried smaller with no image lost or duplicated, JPEGs decoded by nvJPEG, and the pooled conv
layers with flip and multi-scale views.

Skipped where PyTorch sees no GPU (CI has none); benchmarks/gpu_check.sh runs them on a GPU host. Each test
prints what it measured (run with -s to see it)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from retrieval.samples import make_sample_collection
from retrieval.catalog import Catalog
from retrieval.images.device_decode import DeviceJpeg, DeviceJpegDecoder
from retrieval.images.decode import Preprocessing, decode_for_model, inspect_jpeg

from helpers.indexes import build_index

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (CI has none; benchmarks/gpu_check.sh runs these on one)")]


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    data = tmp_path_factory.mktemp("cuda") / "data"
    make_sample_collection(data, per_class=40, size=(500, 375), seed=11)                    # 200 small photos
    make_sample_collection(data / "large", per_class=2, size=(3000, 2250), seed=12)         # 10 decoded by nvJPEG
    return data


def vectors(index_dir) -> dict[str, np.ndarray]:
    catalog = Catalog(index_dir)
    try:
        return catalog.vectors_by_path()
    finally:
        catalog.close()


def nearest_neighbours(by_path: dict[str, np.ndarray], paths: list[str]) -> np.ndarray:
    x = torch.from_numpy(np.stack([by_path[p] for p in paths]))      # (n, 4096)
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    return d.argmin(1).numpy()


def cosines(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> np.ndarray:
    return np.array([float(a[p] @ b[p] / np.linalg.norm(a[p]) / np.linalg.norm(b[p])) for p in a])


@pytest.fixture(scope="module")
def cpu_fp32(collection, tmp_path_factory):
    index = tmp_path_factory.mktemp("cpu") / "index"
    report = build_index(collection, index, device="cpu", workers=4, batch_size=32)
    assert report.extraction["precision"] == "fp32"
    return vectors(index)


def compare(cpu: dict[str, np.ndarray], gpu: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
    """-> (cosine of each image's two vectors, share of images with the same nearest neighbour in both)."""
    assert gpu.keys() == cpu.keys()
    paths = sorted(gpu)
    return cosines(cpu, gpu), float(np.mean(nearest_neighbours(cpu, paths) == nearest_neighbours(gpu, paths)))


def test_gpu_bf16_features_match_cpu_fp32_features(collection, cpu_fp32, tmp_path):
    """The precision alone: the same decoder (the workers' Pillow), bf16 on the GPU against fp32 on the CPU."""
    report = build_index(collection, tmp_path / "gpu", device="cuda", decode="workers", workers=4, batch_size="auto")
    x = report.extraction
    assert x["device"].startswith("cuda") and x["precision"] == "bf16" and x["device_decoded"] == 0
    assert 32 < x["batch_size"] <= 512, "--batch-size auto should fill the GPU with more than the CPU's 32"
    cos, same = compare(cpu_fp32, vectors(tmp_path / "gpu"))
    print(f"\nbf16 on {x['device']} (batch {x['batch_size']}) against fp32 on the CPU, same decoding, {len(cos)} "
          f"images: cosine min {cos.min():.6f}, median {np.median(cos):.6f}; same nearest neighbour for {same:.1%}")
    assert len(cos) == 210 and cos.min() >= 0.999
    assert same >= 0.95


def test_the_gpu_defaults_against_the_cpu(collection, cpu_fp32, tmp_path):
    """What a GPU run does by default (bf16; JPEGs shared between nvJPEG and the workers) against the CPU's fp32 and
    Pillow: nvJPEG decodes differently from libjpeg (chroma upsampling, IDCT), which moves the features of the
    images it decoded more than bf16 does."""
    report = build_index(collection, tmp_path / "gpu", device="cuda", workers=4)
    x = report.extraction
    assert x["precision"] == "bf16" and x["device_decoded"] >= 5 and x["device_share"] is not None
    cos, same = compare(cpu_fp32, vectors(tmp_path / "gpu"))
    print(f"\nGPU defaults (decode {x['decode']}, {x['device_decoded']} of 210 by nvJPEG, share {x['device_share']}) "
          f"against fp32 + Pillow on the CPU: cosine min {cos.min():.6f}, median {np.median(cos):.6f}; same nearest "
          f"neighbour for {same:.1%}")
    assert cos.min() >= 0.995 and same >= 0.95


def test_gpu_fp32_features_match_cpu_fp32_features(collection, cpu_fp32, tmp_path):
    report = build_index(collection, tmp_path / "gpu32", device="cuda", precision="fp32", decode="workers",
                         workers=4, batch_size=64)
    assert report.extraction["precision"] == "fp32" and report.extraction["device_decoded"] == 0
    cos = cosines(cpu_fp32, vectors(tmp_path / "gpu32"))
    print(f"\nfp32 on the GPU against fp32 on the CPU: cosine min {cos.min():.7f}")
    assert cos.min() >= 0.9999


@pytest.mark.parametrize("layer, views", [("conv5-gem", "flip"), ("conv5-rmac", "flip+scales")])
def test_pooled_layers_with_views_on_the_gpu_match_the_cpu(collection, tmp_path, layer, views):
    """The descriptors beyond fc7 through the whole GPU path (nvJPEG at their input size, bf16, views made on the
    device) against the CPU's fp32 and Pillow."""
    build_index(collection, tmp_path / "cpu", device="cpu", workers=4, batch_size=32, layer=layer, views=views)
    report = build_index(collection, tmp_path / "gpu", device="cuda", workers=4, layer=layer, views=views)
    x = report.extraction
    assert x["precision"] == "bf16" and report.network["views"] == views and report.network["dim"] == 256
    cos, same = compare(vectors(tmp_path / "cpu"), vectors(tmp_path / "gpu"))
    print(f"\n{layer} {views} on the GPU (bf16, {x['device_decoded']} of 210 by nvJPEG) against the CPU: cosine min "
          f"{cos.min():.6f}, median {np.median(cos):.6f}; same nearest neighbour for {same:.1%}")
    assert cos.min() >= 0.995 and same >= 0.95


def test_a_real_out_of_memory_batch_is_retried_smaller_with_nothing_lost(tmp_path, caplog):
    data = tmp_path / "data"
    make_sample_collection(data, per_class=24, size=(500, 375), seed=13)                    # 120 images
    reference = tmp_path / "reference"
    build_index(data, reference, model="vgg16", device="cuda", workers=4, batch_size=8)
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info()
    # leave VGG16 (0.8 GB of weights with their bf16 copies) 0.8 GB more: a forward pass of 120 images needs
    # about 2.5 GB at its widest layers (bf16, inference frees each layer's input), so it fails for real and is
    # retried in halves
    hog = torch.empty(max(0, free - int(1.6e9)), dtype=torch.uint8, device="cuda")
    try:
        with caplog.at_level(logging.WARNING, logger="indexer.extract"):
            report = build_index(data, tmp_path / "index", model="vgg16", device="cuda", workers=4, batch_size=120)
    finally:
        del hog
        torch.cuda.empty_cache()
    retries = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    print(f"\nout-of-memory retries: {retries}")
    assert retries, "the batch of 120 should not have fitted"
    assert report.indexed == report.total == 120
    ours, ref = vectors(tmp_path / "index"), vectors(reference)
    assert ours.keys() == ref.keys()                                                        # none lost, none twice
    catalog = Catalog(tmp_path / "index")
    try:
        assert len(catalog.ids()) == 120
    finally:
        catalog.close()
    assert cosines(ref, ours).min() >= 0.999


def test_nvjpeg_crops_match_pillow_crops(tmp_path):
    paths = make_sample_collection(tmp_path, per_class=2, size=(500, 375), seed=14)
    paths += make_sample_collection(tmp_path / "large", per_class=1, size=(4000, 3000), seed=15)
    prep = Preprocessing()
    decoder = DeviceJpegDecoder(prep, torch.device("cuda"), max_pixels=None)
    try:
        result = decoder.crops([DeviceJpeg(i, p.resolve(), inspect_jpeg(p)) for i, p in enumerate(paths)])
    finally:
        decoder.close()
    assert result.crops.is_cuda and not result.failed and result.on_cpu == 0
    diffs = [np.abs(crop.cpu().numpy().astype(int) - decode_for_model(p, prep).pixels.astype(int))
             for p, crop in zip(paths, result.crops)]
    print(f"\nnvJPEG + resize on the GPU against Pillow: mean abs difference "
          f"{max(d.mean() for d in diffs):.3f} at most, 99th percentile {max(np.percentile(d, 99) for d in diffs)}")
    # nvJPEG is not libjpeg (chroma upsampling, IDCT): on an H200, 1.16 levels on average at most, 8 at the 99th
    # percentile, on these pictures' sharp colour edges
    assert max(d.mean() for d in diffs) < 2.0
