"""`--batch-size auto` (the choice from free memory) and the out-of-memory halving that backs it up."""
from __future__ import annotations

import logging
import types

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import indexer.extract as extract
from retrieval.features.batch_size import MAX_AUTO_BATCH, choose_batch_size, resolve_batch_size
from commands.index_images import main as index_main
from commands.options import batch_size_value
from helpers.indexes import recorded_precision
from retrieval.samples import make_sample_collection
from retrieval.catalog import Catalog
from retrieval.names import FAISS_FILE
from retrieval.vectors.vector_index import VectorIndex

VGG16_IMAGE = 60_950_432     # bytes of fp32 activations per 224x224 image (model-info vgg16)
ALEXNET_IMAGE = 2_932_128


def test_cpu_uses_32_and_says_so():
    choice = choose_batch_size("vgg16", "cpu", None, 0)
    assert choice.batch_size == 32 and "CPU" in choice.reason


@pytest.mark.parametrize("model, free, weights, expected", [
    ("vgg16", 8_000_000_000, 830_000_000, 84),          # (8e9 x 0.75 - 0.83e9) / 60.95 MB = 84.8
    ("vgg16", 2_000_000_000, 830_000_000, 10),          # (1.5e9 - 0.83e9) / 60.95 MB = 10.99
    ("alexnet", 2_000_000_000, 366_000_000, 386),       # (1.5e9 - 0.366e9) / 2.93 MB = 386.7
])
def test_cuda_choice_from_free_memory(model, free, weights, expected):
    per_image = VGG16_IMAGE if model == "vgg16" else ALEXNET_IMAGE
    assert expected == int((free * 0.75 - weights) // per_image)
    choice = choose_batch_size(model, torch.device("cuda"), free, weights, margin=0.25)
    assert choice.batch_size == expected
    assert f"{per_image / 1e6:.1f} MB per image" in choice.reason and "25% in reserve" in choice.reason


def test_cuda_choice_is_capped_and_never_zero():
    big = choose_batch_size("alexnet", "cuda", 140_000_000_000, 400_000_000)
    assert big.batch_size == MAX_AUTO_BATCH and "capped" in big.reason
    tiny = choose_batch_size("vgg16", "cuda", 900_000_000, 830_000_000)
    assert tiny.batch_size == 1 and "out-of-memory" in tiny.reason
    assert choose_batch_size("vgg16", "cuda", 8_000_000_000, 830_000_000, margin=0.5).batch_size == 52


def fake_extractor(device: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(model="vgg16", device=torch.device(device), net=torch.nn.Linear(1000, 1000),
                                 preprocessing=types.SimpleNamespace(crop_size=224), largest_input=224)


def test_resolve_keeps_numbers_and_logs_the_auto_choice(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="retrieval.features.batch_size")
    assert resolve_batch_size(7, fake_extractor("cpu")) == 7
    assert resolve_batch_size("auto", fake_extractor("cpu")) == 32
    cpu = [r for r in caplog.records if "auto chose 32" in r.getMessage()]
    assert cpu and "CPU" in cpu[0].getMessage() and cpu[0].levelno == logging.DEBUG, "on the CPU not a line of output"

    monkeypatch.setattr("retrieval.features.batch_size.cuda_free_bytes", lambda device: 8_000_000_000)
    resident = 1000 * 1000 * 4 + 1000 * 4               # the Linear's fp32 weight and bias, already on the GPU
    expected = int(((8_000_000_000 + resident) * 0.75 - 1.5 * resident) // VGG16_IMAGE)
    assert resolve_batch_size(None, fake_extractor("cuda")) == expected == 98
    assert f"auto chose {expected}" in caplog.text and "8.00 GB free on cuda" in caplog.text
    assert any(r.levelno == logging.INFO for r in caplog.records if f"auto chose {expected}" in r.getMessage())


def test_batch_size_value():
    assert batch_size_value(None, None, "auto") == "auto" and batch_size_value(None, None, " AUTO ") == "auto"
    assert batch_size_value(None, None, "16") == 16
    for bad in ("0", "-3", "big", "1.5"):
        with pytest.raises(click.BadParameter):
            batch_size_value(None, None, bad)


class OutOfMemoryAbove:
    """A stand-in for retrieval.search.snapshot.embed that runs out of CUDA memory on chunks larger than `limit`."""

    def __init__(self, limit: int, real=None):  # noqa: ANN001 - the real embed, or None for fake features
        self.limit, self.real, self.calls = limit, real, []

    def __call__(self, extractor, pixels: torch.Tensor, normalize: bool) -> np.ndarray:  # noqa: ANN001
        self.calls.append(len(pixels))
        if len(pixels) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        if self.real is not None:
            return self.real(extractor, pixels, normalize)
        return pixels.float().mean(dim=(2, 3)).numpy()     # (n, 3): one row per image, tells them apart


def test_batch_extractor_halves_on_oom_keeping_order(monkeypatch, caplog):
    fake = OutOfMemoryAbove(3)
    monkeypatch.setattr(extract, "embed", fake)
    pixels = torch.arange(11, dtype=torch.uint8).view(11, 1, 1, 1).expand(11, 3, 2, 2).contiguous()
    mapper = extract.BatchExtractor(types.SimpleNamespace(dim=3), normalize=False, chunk=16)
    out = mapper(pixels)
    np.testing.assert_array_equal(out[:, 0], np.arange(11))            # every image once, in order
    assert mapper.chunk == 2 and fake.calls == [11, 8, 4, 2, 2, 2, 2, 2, 1]
    assert "retrying with batches of 2" in caplog.text


def test_batch_extractor_gives_up_at_one_image(monkeypatch):
    monkeypatch.setattr(extract, "embed", OutOfMemoryAbove(0))
    mapper = extract.BatchExtractor(types.SimpleNamespace(dim=3), normalize=False, chunk=4)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        mapper(torch.zeros(4, 3, 2, 2, dtype=torch.uint8))


def test_run_index_with_oom_indexes_every_image_exactly_once(tmp_path, index_images, monkeypatch):
    data = tmp_path / "data"
    files = make_sample_collection(data, per_class=5, size=(64, 48), seed=3, classes=["red_circles", "blue_squares"])
    reference = tmp_path / "reference"
    index_images(data, reference, batch_size=8)

    fake = OutOfMemoryAbove(2, real=extract.embed)
    monkeypatch.setattr(extract, "embed", fake)
    report = index_images(data, tmp_path / "index", batch_size=8, precision=recorded_precision(reference))
    assert report.indexed == report.total == len(files) == 10
    assert max(fake.calls) == 8 and fake.calls[:3] == [8, 4, 2] and set(fake.calls[3:]) == {2}

    catalog, ref = Catalog(tmp_path / "index"), Catalog(reference)
    try:
        paths = [r.path for r in catalog.list_images(limit=100)]
        assert sorted(paths) == sorted(str(f.relative_to(data)) for f in files)     # none lost, none twice
        faiss_ids = VectorIndex.load(tmp_path / "index" / FAISS_FILE, 4096).ids()
        assert sorted(faiss_ids.tolist()) == catalog.ids().tolist()
        ours = {catalog.get(i).path: v for ids, vecs in catalog.vectors() for i, v in zip(ids, vecs)}
        theirs = {ref.get(i).path: v for ids, vecs in ref.vectors() for i, v in zip(ids, vecs)}
        for path, vec in theirs.items():                                            # each image got its own vector
            np.testing.assert_allclose(ours[path], vec, atol=1e-5)
    finally:
        catalog.close()
        ref.close()


def test_cli_accepts_auto_and_rejects_bad_sizes(tmp_path):
    data = tmp_path / "data"
    make_sample_collection(data, per_class=2, size=(64, 48), seed=0, classes=["red_circles", "blue_squares"])
    runner = CliRunner()
    result = runner.invoke(index_main, [str(data), "--index-dir", str(tmp_path / "index"), "--weights", "random",
                                        "--workers", "0", "--batch-size", "auto", "--json"])
    assert result.exit_code == 0, result.output
    bad = runner.invoke(index_main, [str(data), "--index-dir", str(tmp_path / "index"), "--batch-size", "many"])
    assert bad.exit_code == 2 and "'many' is not a whole number or 'auto'" in bad.output
