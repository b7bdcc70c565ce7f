"""JPEGs decoded on the network's device (`--decode device`): the same crops and features as the workers' Pillow path,
every orientation, and a file the device decoder refuses decoded on the CPU or skipped with its reason.

On this machine the device is the CPU (torchvision's CPU decoder runs the same code as nvJPEG on CUDA);
tests/test_cuda.py runs the CUDA checks where there is a GPU."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from indexer.config import AUTO_DEVICE_SHARE, JobConfig, device_share
from indexer.read import read_files
from retrieval.samples import draw_sample, make_sample_collection
from retrieval.catalog import Catalog
from retrieval.images.device_decode import DeviceJpeg, DeviceJpegDecoder, upright
from retrieval.images.decode import _UPRIGHT, Preprocessing, decode_for_model, inspect_jpeg
from retrieval.images.scan import scan_folder


def write_jpeg(path: Path, size: tuple[int, int], orientation: int = 1, seed: int = 0, mode: str = "RGB") -> Path:
    img = draw_sample("red_circles", (400, 300), random.Random(seed)).resize(size).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, "JPEG", quality=90, exif=exif)
    return path.resolve()


def device_jpeg(row: int, path: Path) -> DeviceJpeg:
    facts = inspect_jpeg(path)
    assert facts is not None, f"{path} should be left for the device"
    return DeviceJpeg(row, path, facts)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_turns_the_image_as_pillow_does(orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)   # (H, W, 3)
    expected = Image.fromarray(stored)
    if orientation in _UPRIGHT:
        expected = expected.transpose(_UPRIGHT[orientation])
    ours = upright(torch.from_numpy(stored).permute(2, 0, 1), orientation)                      # (3, H', W')
    assert np.array_equal(ours.permute(1, 2, 0).numpy(), np.asarray(expected))


def test_crops_match_the_workers_decoder_for_every_size_and_orientation(tmp_path):
    cases = [((500, 375), 1), ((1200, 900), 1), ((4000, 3000), 1), ((300, 700), 1), ((640, 480), 6),
             ((640, 480), 3), ((640, 480), 8), ((224, 224), 1), ((640, 480), 1, "L")]
    jpegs = [device_jpeg(i, write_jpeg(tmp_path / f"{i}.jpg", case[0], case[1], seed=i, mode=(case + ("RGB",))[2]))
             for i, case in enumerate(cases)]
    prep = Preprocessing()
    decoder = DeviceJpegDecoder(prep, torch.device("cpu"), max_pixels=None)
    try:
        result = decoder.crops(jpegs)
    finally:
        decoder.close()
    assert result.decoded == list(range(len(cases))) and not result.failed and result.on_cpu == 0
    for jpeg, crop in zip(jpegs, result.crops):
        ref = decode_for_model(jpeg.path, prep).pixels                                          # (3, 224, 224)
        diff = np.abs(crop.numpy().astype(int) - ref.astype(int))
        # libjpeg either way; the resize differs only in rounding, and in Pillow's draft-mode reduction of
        # large JPEGs (the DCT's own downscale) before its bilinear filter
        assert crop.shape == (3, 224, 224) and diff.mean() < 0.2 and np.percentile(diff, 99) <= 4, jpeg.path.name


def test_a_file_the_device_refuses_is_decoded_on_the_cpu_or_skipped_with_its_reason(tmp_path, monkeypatch):
    good = device_jpeg(0, write_jpeg(tmp_path / "good.jpg", (500, 375)))
    broken_path = tmp_path / "broken.jpg"
    data = bytearray(good.path.read_bytes())
    data[len(data) // 2:] = bytes(len(data) - len(data) // 2)        # header intact, the scan data zeroed
    broken_path.write_bytes(bytes(data))
    broken = device_jpeg(1, broken_path.resolve())
    changed = device_jpeg(2, write_jpeg(tmp_path / "changed.jpg", (500, 375), seed=2))
    with open(changed.path, "ab") as f:
        f.write(b"\0" * 10)                                           # grew after the worker hashed it
    decoder = DeviceJpegDecoder(Preprocessing(), torch.device("cpu"), max_pixels=None)
    refused = []
    real_decode = decoder._decode

    def refuse_the_first(part):      # the device decoder refuses one file it was given (as nvJPEG may)
        out = real_decode(part)
        refused.append(part[0][0].row)
        return [None, *out[1:]]

    monkeypatch.setattr(decoder, "_decode", refuse_the_first)
    try:
        result = decoder.crops([good, broken, changed])
    finally:
        decoder.close()
    assert refused == [0] and result.on_cpu == 1                     # the refused good file was decoded by Pillow
    assert 0 in result.decoded and "changed while it was being indexed" in result.failed[2]
    # zeroed scan data is not an error to libjpeg (a grey picture), so the broken file is decoded, not lost
    assert sorted(result.decoded + list(result.failed)) == [0, 1, 2]


def test_index_images_decoding_on_the_device_gives_the_workers_features(tmp_path, index_images):
    data = tmp_path / "data"
    make_sample_collection(data, per_class=4, size=(320, 240), seed=1)
    write_jpeg(data / "red_circles" / "big.jpg", (2000, 1500), seed=5)
    write_jpeg(data / "red_circles" / "turned.jpg", (640, 480), orientation=6, seed=6)
    Image.new("CMYK", (300, 200), (0, 255, 0, 0)).save(data / "blue_squares" / "cmyk.jpg", "JPEG")   # workers
    Image.new("RGB", (300, 200), "white").save(data / "blue_squares" / "flat.png")                   # workers
    (data / "blue_squares" / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")         # skipped
    workers = index_images(data, tmp_path / "workers", decode="workers", workers=2)
    device = index_images(data, tmp_path / "device", decode="device", workers=2)
    assert device.extraction["device_decoded"] == workers.indexed - 2 and workers.extraction["device_decoded"] == 0
    assert device.indexed == workers.indexed == 24 and [s["path"] for s in device.skipped] == ["blue_squares/junk.jpg"]
    a, b = Catalog(tmp_path / "workers"), Catalog(tmp_path / "device")
    try:
        va, vb = a.vectors_by_path(), b.vectors_by_path()
        assert va.keys() == vb.keys()
        cosines = [float(va[p] @ vb[p] / np.linalg.norm(va[p]) / np.linalg.norm(vb[p])) for p in va]
        assert min(cosines) > 0.999, min(cosines)
        assert "(JPEG)" in b.extraction_record()["last"]["decode"]   # cpu here, cuda on a GPU host
    finally:
        a.close()
        b.close()


def test_which_jpegs_the_workers_leave_for_the_device(monkeypatch):
    import indexer.config as job

    def cfg(**kw) -> JobConfig:
        return JobConfig(data_dir=Path("."), index_dir=Path("index"), **kw)

    assert device_share(cfg(decode="workers", device="cuda")) is None
    assert device_share(cfg(decode="device", device="cpu")) == 1.0
    assert device_share(cfg(decode="auto", device="cpu")) is None        # torchvision's CPU decoder is no help there
    assert device_share(cfg(decode="auto", device="cuda")) == AUTO_DEVICE_SHARE
    monkeypatch.setattr(job, "gpu_present", lambda: False)
    assert device_share(cfg(decode="auto", device="auto")) is None
    monkeypatch.setattr(job, "gpu_present", lambda: True)
    assert device_share(cfg(decode="auto", device="auto")) == AUTO_DEVICE_SHARE


def test_a_share_of_the_jpegs_is_left_for_the_device_by_path(tmp_path):
    data = tmp_path / "data"
    files = make_sample_collection(data, per_class=40, size=(64, 48), seed=2, classes=["red_circles", "blue_squares"])
    scan = scan_folder(data).images
    left = {share: {it["file"].path for it in read_files(data, scan, Preprocessing(), None, share) if "jpeg" in it}
            for share in (None, 0.25, 0.5, 1.0)}
    assert not left[None] and len(left[1.0]) == len(files) == 80
    assert left[0.25] < left[0.5] < left[1.0]                         # a larger share keeps the smaller one's files
    assert 10 <= len(left[0.25]) <= 30 and 25 <= len(left[0.5]) <= 55


class FakeReader:
    device_share = 0.5


def test_the_share_moves_towards_the_decoder_that_keeps_up():
    from indexer.extract import BALANCE_STEP, DeviceBatches, StageClock

    batches = DeviceBatches.__new__(DeviceBatches)          # the balance alone: no network, no decoder
    batches.adaptive, batches.reader, batches._history, batches._last = True, FakeReader(), [], (0.0, 0.0)
    clock = StageClock()
    clock._seconds.update({"wait for decoding": 0.5, "device decoding": 0.1})   # waited for the workers
    batches.balance(clock)
    assert batches.reader.device_share == pytest.approx(0.5 + BALANCE_STEP)
    clock._seconds["device decoding"] += 0.2                                    # no wait: the workers are ahead
    batches.balance(clock)
    batches.balance(clock)
    assert batches.reader.device_share == pytest.approx(0.5 - BALANCE_STEP)
    assert batches.shares() == {"first": 0.55, "median": 0.5, "last": 0.45}


def test_a_shared_run_indexes_every_file_once_with_the_workers_features(tmp_path, index_images, monkeypatch):
    """--decode auto on a GPU host shares the JPEGs between the workers and the device; here the device is the CPU."""
    import indexer.local as job

    data = tmp_path / "data"
    make_sample_collection(data, per_class=8, size=(320, 240), seed=4)
    workers = index_images(data, tmp_path / "workers", decode="workers", workers=2)
    monkeypatch.setattr(job, "device_share", lambda cfg: 0.5)        # what auto starts with where there is a GPU
    shared = index_images(data, tmp_path / "shared", decode="auto", workers=2, batch_size=8)
    x = shared.extraction
    assert shared.indexed == workers.indexed == 40 and 0 < x["device_decoded"] < 40
    assert x["decode"] == "cpu and workers, shared as each keeps up" and 0.05 <= x["device_share"]["last"] <= 0.95
    a, b = Catalog(tmp_path / "workers"), Catalog(tmp_path / "shared")
    try:
        va, vb = a.vectors_by_path(), b.vectors_by_path()
        assert va.keys() == vb.keys() and len(b.ids()) == 40
        assert min(float(va[p] @ vb[p] / np.linalg.norm(va[p]) / np.linalg.norm(vb[p])) for p in va) > 0.999
    finally:
        a.close()
        b.close()
