"""Shared fixtures: synthetic labelled collections and indexes built with seeded random weights (no network).

Fixtures only: the helpers they use live in tests/helpers/, which tests import directly."""
from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch.hub

from helpers.indexes import BuiltIndex, build_index
from retrieval.samples import make_sample_collection


def pytest_collection_modifyitems(config, items) -> None:
    """The Docker test runs last: in CI its images build in the background (.ci/run) while everything else runs."""
    items.sort(key=lambda item: item.path.name == "test_docker.py")


@pytest.fixture(scope="session", autouse=True)
def user_cache_folder(tmp_path_factory) -> Path:
    """The user cache folder (auto's remembered bf16 probe) is the session's own, for this process and the commands it
    starts: a test neither reads nor writes the developer's ~/.cache."""
    folder = tmp_path_factory.mktemp("user-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(folder))
        yield folder


@pytest.fixture
def index_images():
    """index_images(data_dir, index_dir, **JobConfig options) -> RunReport."""
    return build_index


@pytest.fixture(scope="session")
def sample_index(tmp_path_factory) -> BuiltIndex:
    """A read-only index of 5 classes x 6 synthetic pictures (AlexNet fc7, random weights). Do not modify it."""
    root = tmp_path_factory.mktemp("sample")
    data = root / "data"
    make_sample_collection(data, per_class=6, size=(160, 120), seed=1)
    report = build_index(data, root / "index")
    return BuiltIndex(data, root / "index", report)


@pytest.fixture(scope="session")
def compare_index(sample_index, tmp_path_factory) -> BuiltIndex:
    """The sample collection indexed again with other random weights (seed 1): a second network to compare with the
    sample index's on the same images. Read-only."""
    index_dir = tmp_path_factory.mktemp("compare") / "index"
    report = build_index(sample_index.data_dir, index_dir, seed=1)
    return BuiltIndex(sample_index.data_dir, index_dir, report)


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL server for the session (helpers.postgres); skipped when not installed."""
    from helpers.postgres import running_postgres

    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres):
    """The URL (password included) of a fresh, empty database on the private server, dropped afterwards."""
    with postgres.new_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def catalog_url(request):
    """Run a test on both catalog back ends: None (SQLite in the index folder, the default) and a PostgreSQL URL."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache (TORCH_HOME in tmp_path) and no network for torch.hub downloads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def refuse(*_args, **_kwargs):
        raise urllib.error.URLError("network is unreachable (test)")
    monkeypatch.setattr(torch.hub, "urlopen", refuse)
    return tmp_path / "torch-home"


@pytest.fixture(scope="module")
def app_config() -> dict:
    """Extra create_app settings for the `app` fixture; a test module overrides this fixture to change them."""
    return {}


@pytest.fixture(scope="module")
def app(sample_index, tmp_path_factory, app_config):
    """The Flask app over the read-only sample index (hot reload off, thumbnails in a temporary folder)."""
    from api import create_app

    app = create_app({"INDEX_DIR": str(sample_index.index_dir), "RELOAD_INTERVAL_S": 0,
                      "THUMBNAIL_DIR": str(tmp_path_factory.mktemp("thumbnails")), **app_config})
    yield app
    app.extensions["retrieval"].close()


@pytest.fixture
def client(app):
    return app.test_client()
