"""`search-images QUERY`: the images of an index nearest to a query image, as a table or JSON."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from retrieval.system import display_name, terminal_name

from commands.options import (Command, FloatRange, PathArg, UserError, command_settings, db_url_option, exit_without_teardown, index_dir_option,
                              open_index, querying, setup_logging)


@click.command(cls=Command, context_settings=command_settings("search-images"))
@click.argument("query_image", type=PathArg(exists=True, dir_okay=False, allow_dash=True, path_type=Path))
@click.option("-k", type=click.IntRange(min=1), default=10, show_default=True, help="Number of neighbours.")
@index_dir_option
@db_url_option
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the network runs for the query.")
@click.option("--qe", type=click.IntRange(0, 50), default=0, show_default=True, metavar="N",
              help="Query expansion: search again with the query averaged with its first N results (0: off).")
@click.option("--qe-alpha", type=FloatRange(0, 100), default=0.0, show_default=True, metavar="ALPHA",
              help="alpha-QE: weigh each of those results by its cosine similarity to the query ^ ALPHA (0: plain "
                   "average).")
@click.option("--json", "as_json", is_flag=True, help='Print {"results": [...]} as JSON on stdout.')
def main(query_image: Path, k: int, index_dir: Path, db_url: str | None, device: str, qe: int, qe_alpha: float,
         as_json: bool) -> None:
    """Print the K images of the index nearest to QUERY_IMAGE in feature space (- reads it from standard input:
    `curl -s URL | search-images -`).

    The query goes through exactly the network the index was built with. Distances are L2
    distances between feature vectors (0 for an identical image). Options can also be set by
    environment variables (SEARCH_IMAGES_K, ...; see docs/configuration.md).

    Exit status: 0 done, 2 a query that cannot be used (no image, no regular file) or an index that cannot be
    searched (none there, a damaged catalog), 1 a full disk (one line: what to free), 130 interrupted.
    """
    setup_logging(False)
    from retrieval.files import open_regular
    from retrieval.images.decode import ImageDecodeError, Preprocessing, decode_for_model

    shown = "the image on standard input" if str(query_image) == "-" else str(query_image)
    try:   # a file that is no image is refused before torch, FAISS and the network load (seconds)
        if str(query_image) == "-":
            query = _read_stdin()
        else:
            with open_regular(query_image) as f:   # a named pipe or a device is refused, not waited on or read forever
                query = f.read()
        decode_for_model(query, Preprocessing())
    except ImageDecodeError as exc:
        raise UserError(f"cannot use {shown} as a query: {exc}") from exc
    except OSError as exc:
        raise UserError(f"cannot read {shown}: {exc.strerror or exc}") from exc
    from retrieval.search.expansion import QueryExpansion

    with querying(open_index(index_dir, db_url, device), index_dir, db_url) as index:
        try:
            hits, _ = index.search_image(query, k, expansion=QueryExpansion(qe, qe_alpha))
            data_dir = str(index.data_dir)   # the hits' paths are relative to it
        except ImageDecodeError as exc:
            raise UserError(f"cannot use {shown} as a query: {exc}") from exc
    if _being_updated(index_dir):
        click.echo("note: an index-images run is updating this index now: images it has not reached yet are not "
                   "searched", err=True)
    if as_json:
        click.echo(json.dumps({"results": [{"id": h.id, "path": display_name(h.path),
                                            "label": None if h.label is None else display_name(h.label),
                                            "distance": round(h.distance, 6),   # as the API rounds it
                                            "file": display_name(os.path.join(data_dir, h.path))}   # from anywhere
                                           for h in hits], "data_dir": display_name(data_dir)}))
        return
    if not hits:
        click.echo("the index is empty: no neighbours")
        return
    click.echo(f"{'rank':>4}  {'distance':>8}  {'label':<16}  path")
    for rank, h in enumerate(hits, 1):
        click.echo(f"{rank:>4}  {h.distance:>8.4f}  {terminal_name(h.label or '-'):<16}  {terminal_name(h.path)}")


def _being_updated(index_dir: Path) -> bool:
    """Whether an index-images run holds the index now (a lock probe: nothing waits); False when it cannot be told."""
    from indexer.config import ConfigError
    from indexer.locks import writer_running

    try:
        return writer_running(index_dir)
    except ConfigError:
        return False


def _read_stdin() -> bytes:
    """The query image's bytes from standard input, at most the largest file index-images reads. Raises UserError."""
    from retrieval.images.scan import DEFAULT_MAX_FILE_BYTES

    if sys.stdin is None or sys.stdin.isatty():
        raise UserError("- reads the query image from standard input: pipe one in (search-images - < photo.jpg, or "
                        "curl -s URL | search-images -)")
    data = sys.stdin.buffer.read(DEFAULT_MAX_FILE_BYTES + 1)
    if len(data) > DEFAULT_MAX_FILE_BYTES:
        raise UserError(f"the image on standard input is larger than {DEFAULT_MAX_FILE_BYTES // 2**20} MB")
    if not data:
        raise UserError("standard input was empty: no query image")
    return data


search_images_entry = exit_without_teardown(main)
