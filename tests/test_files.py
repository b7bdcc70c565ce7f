"""retrieval.files: atomic_write replaces a file whole, or leaves it as it was and no temporary file behind; a private
copy outlives what is done to its original."""
from __future__ import annotations

import json
import os

import pytest

from retrieval import files
from retrieval.files import atomic_write, descriptor_digest, private_copy, sample_digest


def test_replaces_the_whole_file(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b"x" * 1000)                                     # longer than what replaces it
    assert atomic_write(path, b'{"a": 1}') == path
    assert path.read_bytes() == b'{"a": 1}'
    atomic_write(str(path), lambda f: f.write(json.dumps({"b": 2}).encode()))   # a str path, a writer function
    assert json.loads(path.read_text()) == {"b": 2}
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_new_file_is_created(tmp_path):
    atomic_write(tmp_path / "new.bin", b"\x00\x01")
    assert (tmp_path / "new.bin").read_bytes() == b"\x00\x01"


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_an_error_while_writing_leaves_the_old_file_and_no_temporary_file(tmp_path, error):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"old weights")

    def write(f):  # noqa: ANN001 - the open binary file
        f.write(b"half of the new wei")
        raise error

    with pytest.raises(type(error)):
        atomic_write(path, write)
    assert path.read_bytes() == b"old weights"
    assert os.listdir(tmp_path) == ["weights.pt"], "no .tmp file left in the folder"


def test_a_file_name_that_is_not_utf8(tmp_path):
    name = os.fsdecode(b"caf\xe9.bin")                                # a Latin-1 name: not valid UTF-8
    path = tmp_path / name
    atomic_write(path, b"first")
    atomic_write(path, b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(os.fsencode(tmp_path)) == [b"caf\xe9.bin"]

    def fail(f):  # noqa: ANN001
        f.write(b"partial")
        raise ValueError("no")

    with pytest.raises(ValueError):
        atomic_write(path, fail)
    assert path.read_bytes() == b"second" and os.listdir(os.fsencode(tmp_path)) == [b"caf\xe9.bin"]


def test_a_private_copy_has_no_name_and_outlives_its_original_truncated(tmp_path):
    original = tmp_path / "vectors.faiss"
    data = os.urandom(3 << 20)
    original.write_bytes(data)
    with private_copy(original, [tmp_path]) as copy:
        assert sorted(os.listdir(tmp_path)) == ["vectors.faiss"], "the copy has no name anyone could open"
        assert descriptor_digest(copy.fileno()) == sample_digest(original)
        with open(original, "r+b") as f:
            f.truncate(10)
        assert copy.read() == data


def test_a_private_copy_goes_to_the_next_folder_with_room_or_nowhere(tmp_path, monkeypatch):
    original = tmp_path / "v.bin"
    original.write_bytes(b"x" * 4096)
    roomy, cramped = tmp_path / "roomy", tmp_path / "cramped"
    roomy.mkdir(), cramped.mkdir()
    real_free = files.free_bytes
    monkeypatch.setattr(files, "free_bytes", lambda p: 6000 if str(p).startswith(str(cramped)) else real_free(p))
    with private_copy(original, [tmp_path / "missing", cramped, roomy]) as copy:
        assert copy.read() == b"x" * 4096
    assert private_copy(original, [tmp_path / "missing", cramped]) is None


def test_ctrl_c_inside_torch_save_is_reported_as_the_interrupt_and_loses_nothing(tmp_path):
    """Reproduces: Ctrl-C while index-images saved its random weights printed a traceback and exited 1: torch.save's zip
    writer, interrupted, fails in its own cleanup ("unexpected pos"), and that RuntimeError hid the KeyboardInterrupt."""
    import torch

    path = tmp_path / "weights.pt"
    path.write_bytes(b"old weights")

    class CtrlCAfter:               # the open file, with a Ctrl-C arriving once 64 KiB are written
        def __init__(self, f):  # noqa: ANN001
            self.f, self.written = f, 0

        def write(self, b) -> int:  # noqa: ANN001
            if self.written > 65536:
                raise KeyboardInterrupt
            self.written += len(b)
            return self.f.write(b)

        def flush(self) -> None:
            self.f.flush()

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, lambda f: torch.save({"w": torch.zeros(100_000)}, CtrlCAfter(f)))
    assert path.read_bytes() == b"old weights"
    assert os.listdir(tmp_path) == ["weights.pt"], "no .tmp file left in the folder"
