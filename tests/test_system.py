"""Tests for retrieval.system: whether a GPU is present, told without torch."""
from __future__ import annotations

import pytest

from retrieval import system


@pytest.fixture
def dev(tmp_path, monkeypatch):
    """A stand-in /dev for gpu_present: the NVIDIA driver's control files, no GPU yet; no CUDA_VISIBLE_DEVICES."""
    monkeypatch.setattr(system, "GPU_DEVICE_FILES", str(tmp_path / "nvidia[0-9]*"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for name in ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset"):
        (tmp_path / name).touch()
    return tmp_path


def test_a_gpu_is_present_when_its_device_file_is(dev):
    assert not system.gpu_present(), "the driver's control files alone are no GPU"
    (dev / "nvidia0").touch()
    assert system.gpu_present()


@pytest.mark.parametrize("visible, present", [
    ("", False), ("-1", False), (" -1 ", False), ("-1,0", False),   # CUDA stops at the first invalid entry
    ("0", True), ("1,0", True), ("GPU-8e4f1c2a", True),
])
def test_cuda_visible_devices_can_hide_the_gpus(dev, monkeypatch, visible, present):
    (dev / "nvidia0").touch()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert system.gpu_present() is present
