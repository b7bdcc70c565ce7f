"""Tests for retrieval.features.weights: the weights choice parses and prints back the text the catalog keeps."""
from __future__ import annotations

from pathlib import Path

import pytest

from retrieval.catalog import IndexSettings, weights_label
from retrieval.features.weights import IMAGENET, RANDOM, WeightsChoice


@pytest.mark.parametrize("text", ["imagenet", "random", "/models/tuned.pt", "/data/wei ghts/é.pth",
                                  "/x/\udcff.pt"])   # a name that is not UTF-8 (surrogate escape), as the catalog keeps it
def test_the_stored_text_round_trips(text: str) -> None:
    choice = WeightsChoice.parse(text)
    assert str(choice) == text
    assert WeightsChoice.parse(str(choice)) == choice


def test_kinds() -> None:
    assert WeightsChoice.parse("imagenet") == IMAGENET and IMAGENET.is_imagenet and IMAGENET.path is None
    assert WeightsChoice.parse("random") == RANDOM and RANDOM.is_random and not RANDOM.is_file
    tuned = WeightsChoice.parse("tuned.pt")
    assert tuned.is_file and tuned.path == Path("tuned.pt") and not tuned.is_random
    assert WeightsChoice.parse(tuned) is tuned
    assert WeightsChoice.parse(Path("imagenet")).is_file   # a path is a file, even one named imagenet


def test_resolved_makes_a_file_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert str(WeightsChoice.parse("tuned.pt").resolved()) == str(tmp_path.resolve() / "tuned.pt")
    assert RANDOM.resolved() is RANDOM


def test_source_file(tmp_path: Path) -> None:
    assert IMAGENET.source_file(tmp_path, "alexnet") is None
    assert RANDOM.source_file(tmp_path, "alexnet").parent == tmp_path
    assert WeightsChoice.parse("/m/t.pt").source_file(tmp_path, "alexnet") == Path("/m/t.pt")


def test_label_never_shows_the_path() -> None:
    base = dict(model="alexnet", layer="fc7", seed=0, dim=4096, normalize=True, preprocessing="", data_dir="/d")
    assert weights_label(IndexSettings(weights="random", weights_identity="random:sha256=ab", **base)) == "random"
    tuned = IndexSettings(weights="/secret/tuned.pt", weights_identity="file:/secret/tuned.pt:sha256=0123456789abcdef",
                          **base)
    assert tuned.weights_choice == WeightsChoice("file", Path("/secret/tuned.pt"))
    assert weights_label(tuned) == "tuned.pt (sha256 0123456789ab)"


def test_an_index_whose_weights_file_moved_says_so_and_what_to_do(sample_index, tmp_path: Path) -> None:
    """Reproduces: the fine-tuned weights file moved, and opening its index said "weights must be 'imagenet', 'random'
    or a state dict file; '/.../tuned.pt' is none of these", as if the user had mistyped an option."""
    import shutil

    import retrieval
    from helpers.indexes import build_index
    from retrieval.features.backbones import WeightsUnavailable
    from retrieval.names import random_weights_file

    weights = tmp_path / "tuned.pt"
    shutil.copy(random_weights_file(sample_index.index_dir, "alexnet"), weights)
    build_index(sample_index.data_dir, tmp_path / "index", weights=str(weights))
    weights.rename(tmp_path / "moved.pt")
    with pytest.raises(WeightsUnavailable, match=f"the weights file this index was built with, {weights}, is missing "
                                                 r"\(moved or deleted\?\): put it back there"):
        retrieval.open_index(tmp_path / "index")
    (tmp_path / "moved.pt").rename(weights)
    with retrieval.open_index(tmp_path / "index") as index:
        assert len(index) == 30


def test_the_index_follows_its_weights_file_to_where_it_moved(sample_index, tmp_path: Path) -> None:
    """Reproduces: after `mv tuned.pt moved/`, `index-images data --weights moved/tuned.pt` was refused ("built with
    weights '.../tuned.pt', not '.../moved/tuned.pt'") though the index records the file's SHA-256: the only ways
    on were moving it back or extracting every image again. The same bytes at the new path are its weights now;
    other bytes are still refused."""
    import shutil

    import retrieval
    from helpers.indexes import build_index
    from indexer.config import ConfigError
    from retrieval.names import random_weights_file

    weights = tmp_path / "tuned.pt"
    shutil.copy(random_weights_file(sample_index.index_dir, "alexnet"), weights)
    build_index(sample_index.data_dir, tmp_path / "index", weights=str(weights))
    (tmp_path / "moved").mkdir()
    other = tmp_path / "moved" / "other.pt"
    shutil.copy(random_weights_file(sample_index.index_dir, "alexnet"), other)
    with open(other, "r+b") as f:   # other bytes: other weights
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    new = tmp_path / "moved" / "tuned.pt"
    weights.rename(new)
    with pytest.raises(ConfigError, match="built with weights"):
        build_index(sample_index.data_dir, tmp_path / "index", weights=str(other))
    report = build_index(sample_index.data_dir, tmp_path / "index", weights=str(new))
    assert report.indexed == 0 and report.unchanged == 30, "nothing extracted again"
    assert f"the weights file moved: {weights} -> {new}" in " ".join(report.repairs)
    from retrieval.catalog import Catalog
    catalog = Catalog(tmp_path / "index")
    try:
        assert catalog.settings().weights == str(new) and catalog.settings().weights_identity.startswith(f"file:{new}:")
    finally:
        catalog.close()
    with retrieval.open_index(tmp_path / "index") as index:   # its network loaded from the new place
        assert index.search(sample_index.data_dir / "red_circles" / "red_circles_000.jpg", k=1)[0].distance < 1e-3


def test_a_new_index_of_a_weights_file_does_not_whiten_unless_asked(sample_index, tmp_path: Path) -> None:
    """Whitening gave back most of what fine-tuning won (held-out mAP 0.74-0.77 raw, 0.57-0.59 whitened:
    benchmarks/bench_finetune_whitening.py): an index of a weights file searches fc7 as it is, unless --whiten."""
    import shutil

    from click.testing import CliRunner

    from commands.index_images import main
    from retrieval.catalog import Catalog
    from retrieval.names import random_weights_file

    weights = tmp_path / "tuned.pt"
    shutil.copy(random_weights_file(sample_index.index_dir, "alexnet"), weights)

    def whitening(index: Path, *options: str) -> tuple[dict, str]:
        result = CliRunner().invoke(main, [str(sample_index.data_dir), "--index-dir", str(index), "--workers", "0",
                                           *options])
        assert result.exit_code == 0, result.output
        catalog = Catalog(index)
        try:
            return catalog.vector_index_record()["whiten"], result.stdout
        finally:
            catalog.close()

    recorded, said = whitening(tmp_path / "file", "--weights", str(weights))
    assert recorded["on"] is False and "not whitened: an index of a weights file" in said
    assert whitening(tmp_path / "file", "--weights", str(weights))[0]["on"] is False, "recorded: later runs keep it"
    assert whitening(tmp_path / "asked", "--weights", str(weights), "--whiten")[0]["on"] is True
    explicit, said = whitening(tmp_path / "typed", "--weights", str(weights), "--index-type", "PCAW16,L2norm,Flat")
    assert "not whitened" not in said and "waits for" not in said, said   # a whitening type is built as asked
    assert whitening(tmp_path / "random", "--weights", "random")[0]["on"] is True, \
        "random (and ImageNet) weights still whiten by default"


def test_a_first_run_of_a_weights_file_killed_before_its_faiss_side_still_does_not_whiten(sample_index, tmp_path):
    """Reproduces (a review): the settings are saved when the network loads, the FAISS record only at the end, so a
    first run killed in between left an index that the next run took for an existing one and whitened."""
    import shutil
    import subprocess
    import sys
    import textwrap

    from helpers.indexes import build_index
    from retrieval.catalog import Catalog
    from retrieval.names import random_weights_file

    weights = tmp_path / "tuned.pt"
    shutil.copy(random_weights_file(sample_index.index_dir, "alexnet"), weights)
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os
        from indexer import index_folder
        index_folder({str(sample_index.data_dir)!r}, {str(tmp_path / 'index')!r}, weights={str(weights)!r}, workers=0,
                     batch_size=8, progress=lambda done, total: os._exit(9))   # killed after its first batch
        """)], capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr
    build_index(sample_index.data_dir, tmp_path / "index", weights=str(weights))
    catalog = Catalog(tmp_path / "index")
    try:
        assert catalog.count() == 30 and catalog.vector_index_record()["whiten"]["on"] is False
    finally:
        catalog.close()


def test_a_replaced_weights_file_is_refused_even_with_nothing_to_index(sample_index, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Reproduces (Python API review): after `fine-tune --overwrite` replaced tuned.pt, search-images said to
    re-index, and `index-images data --weights tuned.pt` said "indexed 0, unchanged 30", exit 0, over an index that
    still could not be searched: the file's bytes were checked only when there was something to extract."""
    import shutil
    import subprocess

    import torch

    from helpers.scripts import console_script
    from retrieval.features.backbones import random_state_dict
    from retrieval.names import random_weights_file

    monkeypatch.chdir(tmp_path)   # as a user types it: relative paths
    shutil.copytree(sample_index.data_dir, "data")
    shutil.copy(random_weights_file(sample_index.index_dir, "alexnet"), "tuned.pt")
    def run(name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([console_script(name), *args], capture_output=True, text=True, timeout=300)

    assert run("index-images", "data", "--index-dir", "index-tuned", "--weights", "tuned.pt").returncode == 0
    query = "data/red_circles/red_circles_000.jpg"
    assert run("search-images", query, "--index-dir", "index-tuned").returncode == 0
    original = Path("tuned.pt").read_bytes()
    torch.save(random_state_dict("alexnet", 7), "new.pt")
    Path("new.pt").replace("tuned.pt")   # as fine-tune --overwrite replaces its output

    searched = run("search-images", query, "--index-dir", "index-tuned")
    assert searched.returncode == 2 and "index into another folder with these (index-images DATA --index-dir NEW)" \
        in searched.stderr, searched.stderr
    for args in (["--weights", "tuned.pt"], []):   # nothing to index, with the option or without
        again = run("index-images", "data", "--index-dir", "index-tuned", *args)
        assert again.returncode == 2, again.stdout
        assert f"the weights file {tmp_path / 'tuned.pt'} is not the one this index was built with" in again.stderr
        assert "put the file it was built with back, or index into another folder with these weights" in again.stderr
    Path("tuned.pt").unlink()
    gone = run("index-images", "data", "--index-dir", "index-tuned")
    assert gone.returncode == 2 and "is missing (moved or deleted?): put it back there" in gone.stderr, gone.stderr

    Path("tuned.pt").write_bytes(original)   # put back: searched and indexed again, nothing extracted
    assert run("search-images", query, "--index-dir", "index-tuned").returncode == 0
    put_back = run("index-images", "data", "--index-dir", "index-tuned", "--json")
    assert put_back.returncode == 0 and '"unchanged": 30' in put_back.stdout, put_back.stderr
    assert sorted(p.name for p in tmp_path.glob("tuned.pt*")) == ["tuned.pt"], "no note left beside the user's file"
    assert (tmp_path / "index-tuned" / "weights-file.checked").exists()
