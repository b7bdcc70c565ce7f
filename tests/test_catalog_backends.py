"""Tests for retrieval.catalog on both back ends (SQLite in the index folder, PostgreSQL by URL): names, vectors, transactions, the writer lock."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from sqlalchemy.exc import IntegrityError

from helpers.servers import free_port
from retrieval.catalog import Catalog, CatalogBusy, CatalogUnavailable, IndexSettings, mask_url

LATIN1_LABEL = os.fsdecode(b"caf\xe9")                 # a folder named in Latin-1 on a UTF-8 system


def row(path: str, label: str | None = None, size: int = 10) -> dict:
    return {"path": path, "label": label, "size": size, "mtime_ns": 5, "width": 4, "height": 3, "sha256": "0" * 64}


@pytest.fixture
def catalog(tmp_path, catalog_url):
    cat = Catalog(tmp_path / "index", create=True, url=catalog_url)
    yield cat
    cat.close()


def test_names_that_are_not_utf8_and_vectors_come_back_exactly(catalog, catalog_url, tmp_path):
    paths = [f"{LATIN1_LABEL}/a.jpg", LATIN1_LABEL + "/" + os.fsdecode(b"b-\xff.jpg"), "plain/c.jpg", "d.jpg"]
    labels = [LATIN1_LABEL, LATIN1_LABEL, "plain", None]
    vectors = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    ids, replaced = catalog.write_batch([row(p, lab) for p, lab in zip(paths, labels)], vectors,
                                        [{"path": os.fsdecode(b"bad-\xfe.png"), "size": 1, "mtime_ns": 1, "reason": "empty"}])

    again = Catalog(tmp_path / "index", url=catalog_url)      # a reader: another engine, another connection
    try:
        assert replaced == [] and sorted(again.file_states()) == sorted(paths)
        assert again.labels() == {None: 1, LATIN1_LABEL: 2, "plain": 1}
        assert [r.path for r in again.list_images(label=LATIN1_LABEL)] == sorted(paths[:2])
        assert again.skipped() == [(os.fsdecode(b"bad-\xfe.png"), "empty")]
        got_ids, got = next(again.vectors())
        assert got_ids.tolist() == ids and np.array_equal(got, vectors), "float32 bytes stored exactly"
        assert np.array_equal(again.vector(ids[1]), vectors[1])
    finally:
        again.close()


def test_a_batch_is_one_transaction_and_ids_are_never_reused(catalog):
    first, _ = catalog.write_batch([row("a.jpg"), row("b.jpg")], np.zeros((2, 4), np.float32), [])
    catalog.remove_paths(["b.jpg"])
    with pytest.raises(IntegrityError):   # the same path twice: the whole batch fails, nothing of it stays
        catalog.write_batch([row("c.jpg"), row("c.jpg")], np.zeros((2, 4), np.float32), [])
    assert sorted(catalog.file_states()) == ["a.jpg"]

    replaced_new, replaced = catalog.write_batch([row("a.jpg", size=11), row("b.jpg")], np.ones((2, 4), np.float32), [])

    assert replaced == [first[0]], "a changed file replaces its row"
    assert min(replaced_new) > max(first), "ids of deleted rows are never handed out again (FAISS ids)"
    assert catalog.count() == 2


def test_the_catalog_records_when_the_faiss_file_was_saved_per_index_folder(catalog, catalog_url, tmp_path):
    catalog.save_settings(IndexSettings("alexnet", "fc7", "random", "random:sha256=x", 0, 4, True, "p", str(tmp_path)))
    catalog.write_batch([row("a.jpg")], np.zeros((1, 4), np.float32), [])
    catalog.mark_vectors_saved(catalog.updated_at())
    assert catalog.vectors_in_step()
    if catalog_url is not None:   # several index folders share a database: each has its own FAISS file
        other = Catalog(tmp_path / "replica", url=catalog_url)
        try:
            assert not other.vectors_in_step(), "another folder's FAISS file was never saved"
        finally:
            other.close()
    catalog.write_batch([row("b.jpg")], np.zeros((1, 4), np.float32), [])
    assert not catalog.vectors_in_step(), "a committed batch makes the FAISS file stale"


@pytest.mark.postgres
def test_a_reader_of_an_empty_database_is_told_to_index_first(postgres_url, tmp_path):
    with pytest.raises(FileNotFoundError, match="no index in the database .*run index-images first"):
        Catalog(tmp_path / "index", url=postgres_url)


def test_an_unreachable_server_is_a_clear_error_without_the_password(tmp_path):
    port = free_port()                         # a port nobody listens on
    url = f"postgresql://someone:Very-Secret-1@127.0.0.1:{port}/nothing"
    with pytest.raises(CatalogUnavailable) as info:
        Catalog(tmp_path / "index", url=url)
    message = str(info.value)
    assert "Very-Secret-1" not in message and "someone:***@127.0.0.1" in message
    assert mask_url(url) == f"postgresql://someone:***@127.0.0.1:{port}/nothing"
    with pytest.raises(CatalogUnavailable, match="not a database URL"):
        Catalog(tmp_path / "index", url="no url at all")


@pytest.mark.slow
def test_a_server_that_accepts_and_never_answers_is_given_up_on_in_seconds(tmp_path):
    """Reproduces (scale-out review): a PostgreSQL URL whose host accepts TCP and never answers (a hung server, a
    half-open balancer) held index-images about 130 s before 'connection timeout expired', deaf to Ctrl-C."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)                       # accepted by the kernel, never answered
        url = f"postgresql://someone:pw@127.0.0.1:{listener.getsockname()[1]}/nothing"
        started = time.monotonic()
        with pytest.raises(CatalogUnavailable, match="timeout"):
            Catalog(tmp_path / "index", url=url)
        assert time.monotonic() - started < 30
        started = time.monotonic()               # the URL's own setting wins
        with pytest.raises(CatalogUnavailable, match="timeout"):
            Catalog(tmp_path / "index", url=url + "?connect_timeout=2")
        assert time.monotonic() - started < 8


@pytest.mark.postgres
def test_the_writer_lock_is_held_by_one_process_and_released_when_it_is_killed(postgres_url, tmp_path):
    Catalog(tmp_path / "index", create=True, url=postgres_url).close()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from retrieval.catalog import Catalog\n"
         f"c = Catalog({str(tmp_path / 'other')!r}, url={postgres_url!r})\n"
         "with c.writer_lock():\n    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        catalog = Catalog(tmp_path / "index", url=postgres_url)
        with pytest.raises(CatalogBusy, match="another index-images run is updating the catalog in postgresql"):
            with catalog.writer_lock():
                pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        deadline = time.monotonic() + 30        # the server ends the killed process's session as its socket closes
        while True:
            try:
                with catalog.writer_lock():
                    break
            except CatalogBusy:
                assert time.monotonic() < deadline, "the lock outlived the killed process"
                time.sleep(0.05)
        catalog.close()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_every_command_refuses_an_unreachable_database_with_exit_2_and_never_shows_the_password(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from commands.serve_images import main as serve_main
    from commands.index_images import main as index_main
    from commands.search_images import main as search_main
    from commands.evaluate_index import main as evaluate_main

    port = free_port()                         # a port nobody listens on
    url = f"postgresql://someone:Very-Secret-1@127.0.0.1:{port}/photos"
    (tmp_path / "data").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "q.png")
    commands = [(index_main, [str(tmp_path / "data")]), (search_main, [str(tmp_path / "q.png")]),
                (evaluate_main, []), (serve_main, [])]
    for command, args in commands:
        for options, env in [(["--db-url", url], {}), ([], {"RETRIEVAL_DB_URL": url})]:
            result = CliRunner().invoke(command, [*args, "--index-dir", str(tmp_path / "index"), *options], env=env)
            assert result.exit_code == 2, (command.name, result.output)
            assert f"someone:***@127.0.0.1:{port}/photos" in result.output, result.output
            assert "Very-Secret-1" not in result.output


@pytest.mark.parametrize("secret_in", ["userinfo", "query", "query-upper-case", "not-percent-encoded"])
def test_a_password_is_masked_wherever_a_url_is_shown_in_any_form_sqlalchemy_accepts(tmp_path, secret_in):
    from click.testing import CliRunner

    from commands.index_images import main as index_main
    from commands.serve_images import main as serve_main

    port = free_port()                         # a port nobody listens on
    url, shown = {
        "userinfo": (f"postgresql://someone:Very-Secret-1@127.0.0.1:{port}/photos",
                     f"postgresql://someone:***@127.0.0.1:{port}/photos"),
        "query": (f"postgresql://someone@127.0.0.1:{port}/photos?password=Very-Secret-1&sslmode=disable",
                  f"postgresql://someone@127.0.0.1:{port}/photos?password=***&sslmode=disable"),
        "query-upper-case": (f"postgresql://someone@127.0.0.1:{port}/photos?PASSWORD=Very-Secret-1",
                             f"postgresql://someone@127.0.0.1:{port}/photos?PASSWORD=***"),
        # reproduces: "postgresql://someone:***@Secret/1%40127.0.0.1...: failed to resolve host 'Secret'": a bare @ or /
        # in the password split it, and pieces of it were shown as the host and the database
        "not-percent-encoded": (f"postgresql://someone:Very@Secret/1@127.0.0.1:{port}/photos",
                                f"postgresql://***@127.0.0.1:{port}/photos"),
    }[secret_in]
    assert mask_url(url) == shown
    (tmp_path / "data").mkdir()
    printed = CliRunner().invoke(serve_main, ["--index-dir", str(tmp_path / "index"), "--db-url", url, "--print-config"])
    refused = CliRunner().invoke(index_main, [str(tmp_path / "data"), "--index-dir", str(tmp_path / "index"),
                                              "--db-url", url])
    assert printed.exit_code == 0 and shown in printed.output, printed.output
    assert refused.exit_code == 2 and shown in refused.output, refused.output
    for output in (printed.output, refused.output):
        assert "Very-Secret-1" not in output and "Secret" not in output
    if secret_in == "not-percent-encoded":
        assert "not percent-encoded (write @ as %40" in refused.output


def test_labels_come_in_the_order_a_person_looks_for_them(catalog):
    """Reproduces: the gallery listed 'Green Stripes 2024' before 'blue_squares' (SQLite sorts capitals first; a
    PostgreSQL database sorts by its locale)."""
    labels = ["blue_squares", "Green Stripes 2024", None, "apples", "Zebra"]
    catalog.write_batch([row(f"{label or 'top'}/x.jpg", label) for label in labels],
                        np.zeros((len(labels), 16), np.float32), [])
    assert list(catalog.labels()) == ["apples", "blue_squares", "Green Stripes 2024", "Zebra", None]


def test_a_password_with_an_at_sign_not_percent_encoded_is_one_line_saying_how_to_write_it(tmp_path):
    """Reproduces: --db-url postgresql://retrieval:p@ss:w/rd@HOST/photos ended in SQLAlchemy's traceback,
    'ValueError: invalid literal for int() with base 10: 'w''."""
    from click.testing import CliRunner

    from commands.evaluate_index import main as evaluate_main
    from commands.index_images import main as index_main

    (tmp_path / "data").mkdir()
    url = "postgresql://retrieval:p@ss:w/rd@127.0.0.1:5432/photos"
    for command, args in [(index_main, [str(tmp_path / "data")]), (evaluate_main, [])]:
        result = CliRunner().invoke(command, [*args, "--index-dir", str(tmp_path / "index"), "--db-url", url])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert "a password holding @ : / or % is written percent-encoded: p%40ss for p@ss" in result.output
        assert "rd@" not in result.output


@pytest.mark.postgres
def test_a_database_user_without_rights_on_the_tables_is_told_what_to_grant(postgres, postgres_url, sample_index,
                                                                             tmp_path):
    """Reproduces: a database user without SELECT on the catalog's tables got sqlalchemy's ProgrammingError traceback,
    'permission denied for table index_settings'."""
    from click.testing import CliRunner
    from sqlalchemy.engine import make_url

    from commands.evaluate_index import main as evaluate_main
    from commands.index_images import main as index_main

    built = CliRunner().invoke(index_main, [str(sample_index.data_dir), "--index-dir", str(tmp_path / "index"),
                                            "--db-url", postgres_url, "--weights", "random"])
    assert built.exit_code == 0, built.output
    postgres.admin("DO $$ BEGIN CREATE ROLE outsider LOGIN PASSWORD 'outsider-pw'; EXCEPTION WHEN duplicate_object "
                   "THEN NULL; END $$")
    outsider = make_url(postgres_url).set(username="outsider", password="outsider-pw").render_as_string(
        hide_password=False)
    for command, args in [(evaluate_main, []), (index_main, [str(sample_index.data_dir)])]:
        result = CliRunner().invoke(command, [*args, "--index-dir", str(tmp_path / "index"), "--db-url", outsider])
        assert result.exit_code == 2, result.output
        assert "the database user may not use the catalog's tables in postgresql://outsider:***@" in result.output
        assert "permission denied for table" in result.output and "GRANT SELECT" in result.output
        assert "outsider-pw" not in result.output and "Traceback" not in result.output


@pytest.mark.postgres
def test_a_replica_folder_not_made_yet_is_named_with_the_weights_it_needs(postgres_url, sample_index, tmp_path):
    """Reproduces: a replica started on a folder that did not exist yet was told to copy the random weights file into
    it, and the `cp` then failed; the message says to make the folder first now."""
    from click.testing import CliRunner

    from commands.index_images import main as index_main
    from commands.search_images import main as search_main

    built = CliRunner().invoke(index_main, [str(sample_index.data_dir), "--index-dir", str(tmp_path / "writer"),
                                            "--db-url", postgres_url, "--weights", "random"])
    assert built.exit_code == 0, built.output
    query = sorted(sample_index.data_dir.rglob("*.jpg"))[0]
    replica = tmp_path / "replica"
    found = CliRunner().invoke(search_main, [str(query), "--index-dir", str(replica), "--db-url", postgres_url])
    assert found.exit_code == 2, found.output
    assert f"random weights file {replica / 'random-weights-alexnet.pt'} is missing (the folder {replica} itself does " \
           "not exist yet: make it first, mkdir -p); copy it from the index folder that has it" in found.output
