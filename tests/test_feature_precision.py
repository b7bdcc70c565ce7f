"""retrieval.features.precision and the extractor's precisions on the CPU: bf16 where the CPU has bf16 units
(refused elsewhere), auto's start-up probe, and bf16 features against fp32 ones."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from helpers.precision import needs_cpu_bf16
from torchvision import models

from retrieval.features import backbones
from retrieval.features.backbones import FeatureExtractor, PrecisionUnavailable, precision_for_index
from retrieval.features.precision import bf16_faster
from retrieval.images.decode import decode_for_model
from retrieval.samples import SAMPLE_CLASSES, draw_sample

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    return models.alexnet(weights=None).state_dict()


def sample_pixels(n: int) -> torch.Tensor:
    """n synthetic photos, decoded and cropped as queries are: uint8 (n, 3, 224, 224)."""
    import io

    rng = random.Random(3)
    crops = []
    for i in range(n):
        out = io.BytesIO()
        draw_sample(list(SAMPLE_CLASSES)[i % len(SAMPLE_CLASSES)], (320, 240), rng).save(out, "JPEG", quality=90)
        crops.append(decode_for_model(out.getvalue(), backbones.preprocessing_for("alexnet")).pixels)
    return torch.from_numpy(np.stack(crops))


def test_a_cpu_without_bf16_units_refuses_bf16_and_auto_runs_fp32_without_a_probe(monkeypatch, state):
    monkeypatch.setattr(backbones, "cpu_bf16_instructions", lambda: None)
    monkeypatch.setattr(backbones, "bf16_faster", lambda *a: pytest.fail("no probe where bf16 is not an option"))
    with pytest.raises(PrecisionUnavailable, match="no bf16 instructions.*--precision fp32"):
        FeatureExtractor("alexnet", "fc7", state, CPU, precision="bf16")
    assert FeatureExtractor("alexnet", "fc7", state, CPU, precision="auto").precision == "fp32"
    # an index computed in bf16 elsewhere (a GPU) is queried in fp32 here
    assert precision_for_index("bf16", CPU) == "fp32" and precision_for_index(None, CPU) == "fp32"


@needs_cpu_bf16
@pytest.mark.parametrize("faster", [True, False])
def test_auto_takes_the_precision_the_probe_finds_faster(monkeypatch, tmp_path, state, faster):
    monkeypatch.setattr(backbones, "_PROBED", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))    # nothing remembered from an earlier probe
    monkeypatch.setattr(backbones, "bf16_faster", lambda *a: (faster, {"fp32_ms": 20.0, "bf16_ms": 13.0 if faster else 25.0}))
    extractor = FeatureExtractor("alexnet", "fc7", state, CPU, precision="auto")
    assert extractor.precision == ("bf16" if faster else "fp32")
    assert {p.dtype for p in extractor.net.parameters()} == {torch.bfloat16 if faster else torch.float32}
    assert extractor(sample_pixels(1)).dtype == torch.float32
    assert precision_for_index("bf16", CPU) == "bf16" and precision_for_index("fp32", CPU) == "fp32"


@needs_cpu_bf16
def test_a_probe_that_chose_bf16_is_remembered_on_this_machine_and_one_that_chose_fp32_runs_again(monkeypatch, tmp_path,
                                                                                                   state):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    probes = []

    def probe(faster):
        def timed(*_calls):
            probes.append(faster)
            return faster, {"fp32_ms": 20.0, "bf16_ms": 13.0 if faster else 25.0}
        return timed

    def new_process_extractor(faster: bool) -> FeatureExtractor:   # a later index-images: nothing probed in memory
        monkeypatch.setattr(backbones, "_PROBED", {})
        monkeypatch.setattr(backbones, "bf16_faster", probe(faster))
        return FeatureExtractor("alexnet", "fc7", state, CPU, precision="auto")

    assert new_process_extractor(False).precision == "fp32"
    assert new_process_extractor(False).precision == "fp32" and probes == [False, False]   # fp32: asked again
    assert not (tmp_path / "cnn-image-retrieval" / "precision-probe.json").exists()
    first = new_process_extractor(True)
    assert first.precision == "bf16" and probes == [False, False, True]
    later = new_process_extractor(False)          # a busy moment would now say fp32, but it is not asked
    assert later.precision == "bf16" and probes == [False, False, True]
    assert {p.dtype for p in later.net.parameters()} == {torch.bfloat16}
    assert later.probe["bf16_ms"] == 13.0 and later.probe["probed"]
    # another network (or another torch, CPU, thread count) is its own question
    monkeypatch.setattr(backbones, "_PROBED", {})
    assert FeatureExtractor("alexnet", "fc6", state, CPU, precision="auto").precision == "fp32"
    assert probes == [False, False, True, False]


@needs_cpu_bf16
def test_a_damaged_or_unwritable_probe_cache_only_means_probing_again(monkeypatch, tmp_path, state):
    probes = []
    monkeypatch.setattr(backbones, "bf16_faster", lambda *a: probes.append(1) or (True, {"fp32_ms": 20.0, "bf16_ms": 9.0}))
    cache = tmp_path / "cache" / "cnn-image-retrieval" / "precision-probe.json"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"\x00{not json")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(backbones, "_PROBED", {})
    assert FeatureExtractor("alexnet", "fc7", state, CPU, precision="auto").precision == "bf16" and len(probes) == 1
    assert "bf16_ms" in cache.read_text()                                   # rewritten whole
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))       # the cache folder cannot be made
    monkeypatch.setattr(backbones, "_PROBED", {})
    assert FeatureExtractor("alexnet", "fc7", state, CPU, precision="auto").precision == "bf16" and len(probes) == 2


@needs_cpu_bf16
def test_bf16_features_on_the_cpu_point_where_fp32_ones_do(state):
    pixels = sample_pixels(6)
    fp32 = FeatureExtractor("alexnet", "fc7", state, CPU, precision="fp32")(pixels).numpy()
    bf16 = FeatureExtractor("alexnet", "fc7", state, CPU, precision="bf16")
    assert bf16.precision == "bf16"
    batched, alone = bf16(pixels).numpy(), bf16(pixels[:1]).numpy()
    cosine = (fp32 * batched).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(batched, axis=1)
    assert cosine.min() >= 0.999, cosine
    assert np.allclose(alone[0], batched[0], rtol=1e-2, atol=1e-3), "a query alone is computed as in a batch"


def test_the_probe_times_both_alternately_and_wants_a_clear_win():
    calls = []
    faster, ms = bf16_faster(lambda: calls.append("fp32"), lambda: calls.append("bf16"), runs=2)
    assert calls == ["fp32", "bf16"] * 3                  # one warm-up each, then two timed each, alternating
    assert set(ms) == {"fp32_ms", "bf16_ms"}
    slow_fp32, _ = bf16_faster(lambda: torch.ones(300, 300) @ torch.ones(300, 300), lambda: None, runs=2)
    assert slow_fp32
    assert not bf16_faster(lambda: None, lambda: torch.ones(300, 300) @ torch.ones(300, 300), runs=2)[0]
