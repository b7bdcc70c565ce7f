"""Tests for retrieval.features.backbones: fc6/fc7 after ReLU for AlexNet and VGG16, weights choices, offline message."""
from __future__ import annotations

import hashlib
import os
import time

import pytest
import torch
from torchvision import models

from retrieval.features.backbones import (FeatureExtractor, OneDNNLinear, WeightsUnavailable, imagenet_cache_path, load_state_dict,
                                 onednn_linear_available, random_weights_file)
from retrieval.features.digests import file_sha256, hash_ahead


def reference_features(net: torch.nn.Module, x: torch.Tensor, upto: int) -> torch.Tensor:
    """Run the torchvision module by hand: features -> avgpool -> flatten -> classifier[:upto]."""
    with torch.no_grad():
        h = torch.flatten(net.avgpool(net.features(x)), 1)
        return net.classifier[:upto](h)


@pytest.mark.parametrize("model, layer, upto", [
    ("alexnet", "fc6", 3),   # Dropout, Linear, ReLU
    ("alexnet", "fc7", 6),   # ... Dropout, Linear, ReLU
    ("vgg16", "fc6", 2),     # Linear, ReLU
    ("vgg16", "fc7", 5),     # ... Dropout, Linear, ReLU
])
def test_layer_is_the_relu_output_of_the_named_fc_layer(model, layer, upto):
    torch.manual_seed(0)
    net = getattr(models, model)(weights=None).eval()
    extractor = FeatureExtractor(model, layer, net.state_dict(), torch.device("cpu"), precision="fp32")
    pixels = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)

    feats = extractor(pixels)
    expected = reference_features(net, extractor.preprocessing.normalise(pixels), upto)

    assert feats.shape == (2, 4096) and feats.dtype == torch.float32
    assert extractor.dim == 4096
    assert (feats >= 0).all(), "taken after the ReLU"
    assert (feats > 0).any()
    assert torch.allclose(feats, expected, atol=1e-5, rtol=1e-4)
    assert not extractor.net.training


def test_random_weights_are_seeded_saved_and_reused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, id_a = load_state_dict("alexnet", "random", tmp_path / "a", create=True, seed=3)
    b, id_b = load_state_dict("alexnet", "random", tmp_path / "b", create=True, seed=3)
    again, id_again = load_state_dict("alexnet", "random", tmp_path / "a", create=False)

    assert random_weights_file(tmp_path / "a", "alexnet").exists()
    assert id_a == id_b == id_again and id_a.startswith("random:sha256=")
    for key in a:
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], again[key])


def test_a_different_seed_gives_a_different_network(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, id_a = load_state_dict("alexnet", "random", tmp_path / "a", create=True, seed=0)
    b, id_b = load_state_dict("alexnet", "random", tmp_path / "b", create=True, seed=1)
    assert id_a != id_b
    assert not torch.equal(a["features.0.weight"], b["features.0.weight"])


def test_missing_random_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsUnavailable, match="missing"):
        load_state_dict("alexnet", "random", tmp_path, create=False)


def test_offline_imagenet_weights_say_where_the_file_would_go(offline_hub, capfd):
    with pytest.raises(WeightsUnavailable) as err:
        load_state_dict("alexnet", "imagenet", None)
    printed = capfd.readouterr()
    assert "Downloading" not in printed.out + printed.err, "no line that reads as if a download had started"
    message = str(err.value)
    assert str(imagenet_cache_path("alexnet")) in message and str(offline_hub) in message
    assert err.value.offline_imagenet and err.value.cache_path == imagenet_cache_path("alexnet")
    assert "--" not in message, "the library speaks in its own terms; the command line names its flags"


@pytest.mark.parametrize("zip_format", [True, False], ids=["mapped", "legacy-format-read-whole"])
def test_cached_imagenet_weights_load_without_network(offline_hub, zip_format):
    torch.manual_seed(0)
    state = models.alexnet(weights=None).state_dict()
    cache = imagenet_cache_path("alexnet")
    cache.parent.mkdir(parents=True)
    torch.save(state, cache, _use_new_zipfile_serialization=zip_format)

    loaded, identity = load_state_dict("alexnet", "imagenet", None)

    assert identity == "imagenet:AlexNet_Weights.IMAGENET1K_V1"
    assert torch.equal(loaded["classifier.4.weight"], state["classifier.4.weight"])


def test_state_dict_file_weights(tmp_path):
    torch.manual_seed(5)
    state = models.alexnet(weights=None).state_dict()
    torch.save(state, tmp_path / "mine.pth")

    loaded, identity = load_state_dict("alexnet", str(tmp_path / "mine.pth"), None)

    assert identity.startswith("file:") and "sha256=" in identity
    assert torch.equal(loaded["features.0.weight"], state["features.0.weight"])


def test_a_weights_file_hashed_ahead_and_then_replaced_is_named_by_its_new_bytes(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"old weights" * 100_000)
    hash_ahead(path)                                           # index-images starts this before importing torch
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()

    hash_ahead(path)
    fresh = tmp_path / "fresh.pt"
    fresh.write_bytes(b"new weights, longer" * 100_000)
    os.replace(fresh, path)                                    # replaced after the early hash started
    assert file_sha256(path) == hashlib.sha256(b"new weights, longer" * 100_000).hexdigest()


def test_a_weights_file_is_read_once_per_process_until_it_changes(tmp_path, monkeypatch):
    """serve-images checked the weights against the index (a hash of hundreds of MB) and then hashed them again to
    load them. A file unchanged since is hashed once; one changed in place, even to the same size, is read again."""
    from retrieval.features import digests

    path = tmp_path / "w.pt"
    path.write_bytes(b"a" * 1000)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))        # written long ago
    time.sleep(2.1)                                            # and its status changed seconds ago, not just now
    reads = []
    real = digests._sha256
    monkeypatch.setattr(digests, "_sha256", lambda p: reads.append(p) or real(p))
    assert file_sha256(path) == file_sha256(path) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert len(reads) == 1
    with open(path, "r+b") as f:                               # damaged in place: same inode, same size
        f.write(b"b")
    assert file_sha256(path) == hashlib.sha256(b"b" + b"a" * 999).hexdigest()   # just written: not kept
    assert file_sha256(path) == hashlib.sha256(b"b" + b"a" * 999).hexdigest() and len(reads) == 3
    # rewritten in place with its modification time put back (cp -p, touch -r, rsync -t): its status-change time
    # moved, so it is read again (a review found the old hash returned)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    time.sleep(2.1)                                            # the change itself no longer recent
    file_sha256(path)
    reads.clear()
    with open(path, "r+b") as f:
        f.write(b"c")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    assert file_sha256(path) == hashlib.sha256(b"c" + b"a" * 999).hexdigest() and len(reads) == 1


def test_a_network_keeps_its_weights_when_the_file_is_replaced_under_it(tmp_path):
    """Random weights are memory-mapped: a new file put in their place (a rebuilt index) leaves a loaded network as
    it was, and the next load reads the new one."""
    (tmp_path / "other").mkdir()
    state, identity = load_state_dict("alexnet", "random", tmp_path, create=True, seed=0)
    extractor = FeatureExtractor("alexnet", "fc7", state, torch.device("cpu"))
    pixels = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    before = extractor(pixels)

    _, other_identity = load_state_dict("alexnet", "random", tmp_path / "other", create=True, seed=1)
    os.replace(random_weights_file(tmp_path / "other", "alexnet"), random_weights_file(tmp_path, "alexnet"))

    assert torch.equal(extractor(pixels), before)
    again, again_identity = load_state_dict("alexnet", "random", tmp_path)
    assert again_identity == other_identity != identity
    assert not torch.equal(FeatureExtractor("alexnet", "fc7", again, torch.device("cpu"))(pixels), before)


def test_weights_that_do_not_fit_the_model_are_refused():
    vgg_state = models.vgg16(weights=None).state_dict()
    # the other backbone's weights are named as such, with the option to pass (not torch's "size mismatch" list)
    with pytest.raises(WeightsUnavailable, match="do not fit torchvision's alexnet: they are vgg16's .*--model vgg16"):
        FeatureExtractor("alexnet", "fc7", vgg_state, torch.device("cpu"))
    alexnet_state = models.alexnet(weights=None).state_dict()
    with pytest.raises(WeightsUnavailable, match="do not fit torchvision's vgg16: they are alexnet's"):
        FeatureExtractor("vgg16", "fc7", alexnet_state, torch.device("cpu"))
    resnet_like = {"conv1.weight": torch.zeros(64, 3, 7, 7)}
    with pytest.raises(WeightsUnavailable, match="do not fit torchvision's alexnet: missing features.0.weight"):
        FeatureExtractor("alexnet", "fc7", resnet_like, torch.device("cpu"))


@pytest.mark.parametrize("model", ["alexnet", "vgg16"])
def test_cut_network_equals_torchvision_feature_extractor_at_the_named_node(model):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    from retrieval.features.backbones import MODELS, cut_at
    torch.manual_seed(1)
    net = getattr(models, model)(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    for layer, node in MODELS[model].layers.items():
        assert node in get_graph_node_names(net)[1]
        reference = create_feature_extractor(net, {node: layer})
        with torch.no_grad():
            assert torch.allclose(cut_at(net, node)(x), reference(x)[layer], atol=1e-5), (model, layer)


def test_building_a_network_does_not_disturb_forward_passes_in_other_threads():
    import threading

    torch.manual_seed(0)
    state = models.alexnet(weights=None).state_dict()
    extractor = FeatureExtractor("alexnet", "fc7", state, torch.device("cpu"), precision="fp32")
    x = torch.randn(1, 3, 64, 64)     # small, so many forward passes overlap each build
    errors: list[BaseException] = []
    running, stop = threading.Event(), threading.Event()

    def forward_loop():
        while not stop.is_set():
            try:
                with torch.no_grad():
                    extractor.net(x)
                running.set()
            except Exception as exc:   # noqa: BLE001 - any failure is what this test looks for
                errors.append(exc)
                return

    t = threading.Thread(target=forward_loop)
    t.start()
    assert running.wait(30), errors
    try:
        for _ in range(10):
            FeatureExtractor("alexnet", "fc7", state, torch.device("cpu"), precision="fp32")
            if errors:
                break
    finally:
        stop.set()
        t.join()
    assert not errors, errors


@pytest.mark.skipif(not onednn_linear_available(), reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_onednn_linear_computes_what_nn_linear_does(rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(9216, 4096).requires_grad_(False)
    x = torch.relu(torch.randn(rows, 9216))
    assert torch.allclose(OneDNNLinear(linear)(x), linear(x), atol=1e-5, rtol=1e-5)


def test_cpu_extractor_runs_its_fc_layers_through_onednn_with_the_same_weights():
    torch.manual_seed(0)
    state = models.alexnet(weights=None).state_dict()
    extractor = FeatureExtractor("alexnet", "fc7", state, torch.device("cpu"), precision="fp32")
    linears = [m for m in extractor.net.modules() if isinstance(m, (torch.nn.Linear, OneDNNLinear))]

    assert len(linears) == 2   # fc6, fc7 (fc8 is cut off)
    if onednn_linear_available():
        assert all(type(m) is OneDNNLinear for m in linears)
    own = extractor.net.state_dict()
    for key in ("3.1.weight", "3.1.bias", "3.4.weight"):   # classifier.1 (fc6), classifier.4 (fc7)
        assert torch.equal(own[key], state[key.replace("3.", "classifier.", 1)])


@pytest.mark.parametrize("last_layer", ["absent", "other size"])
def test_a_file_without_fc8_or_with_another_head_gives_the_same_fc7_features(last_layer):
    torch.manual_seed(2)
    net = models.alexnet(weights=None).eval()
    state = net.state_dict()
    if last_layer == "absent":       # fine-tune's default file: the backbone through fc7
        state = {k: v for k, v in state.items() if not k.startswith("classifier.6.")}
    else:                            # fine-tune --keep-head: a head for 3 classes
        state = {**state, "classifier.6.weight": torch.zeros(3, 4096), "classifier.6.bias": torch.zeros(3)}
    pixels = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)

    extractor = FeatureExtractor("alexnet", "fc7", state, torch.device("cpu"), precision="fp32")

    expected = reference_features(net, extractor.preprocessing.normalise(pixels), 6)
    assert torch.allclose(extractor(pixels), expected, atol=1e-5, rtol=1e-4)


def test_a_file_missing_a_layer_before_fc8_is_refused():
    state = {k: v for k, v in models.alexnet(weights=None).state_dict().items() if not k.startswith("classifier.4.")}
    with pytest.raises(WeightsUnavailable, match="do not fit.*missing classifier.4"):
        FeatureExtractor("alexnet", "fc7", state, torch.device("cpu"))
