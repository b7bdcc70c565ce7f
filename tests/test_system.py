"""Tests for retrieval.system: whether a GPU is present, told without torch; a process without Triton."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


@pytest.mark.slow
def test_a_process_that_leaves_out_triton_still_runs_the_network_without_it():
    code = ("import sys; from retrieval.system import leave_out_triton; leave_out_triton(); import torch, torchvision; "
            "net = torchvision.models.alexnet().eval(); out = net(torch.zeros(1, 3, 224, 224)); "
            "print(out.shape[1], [m for m, mod in sys.modules.items() if m.split('.')[0] == 'triton' and mod])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1000", "[]"]


@pytest.mark.parametrize("held", [True, False])
def test_a_ctrl_c_during_a_held_import_interrupts_once_the_module_has_loaded_whole(tmp_path, held):
    """Why the console scripts hold Ctrl-C while torch is imported: a KeyboardInterrupt raised inside torch's import
    (in Python called from its C++) aborted the process with a core dump instead of exiting 130. Here a module whose
    import is interrupted halfway: held, its code runs to its end and the interrupt comes as the import returns."""
    (tmp_path / "slow_to_load.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGINT)\n"
                                              "print('second half ran', flush=True)\n")
    # Ctrl-C as a terminal delivers it: a job started in the background by a script inherits SIGINT ignored.
    script = ("import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
              f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nfrom retrieval import system\n"
              f"if {held}:\n    system.hold_interrupts_while_importing('slow_to_load')\n"
              "try:\n    import slow_to_load\nexcept KeyboardInterrupt:\n    print('interrupted')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:-1] == (["second half ran", "interrupted"] if held else ["interrupted"]), done.stdout
