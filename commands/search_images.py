"""`search-images QUERY`: the images of an index nearest to a query image, as a table or JSON."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from retrieval.names import MAX_EF_SEARCH, MAX_NPROBE
from retrieval.system import display_name, terminal_name

from commands.options import (Command, FloatRange, PathArg, UserError, command_settings, db_url_option, exit_without_teardown, index_dir_option,
                              open_index, querying, setup_logging)


@click.command(cls=Command, context_settings=command_settings("search-images"))
@click.argument("query_images", metavar="QUERY_IMAGE...", nargs=-1, required=True,
                type=PathArg(exists=True, dir_okay=False, allow_dash=True, path_type=Path))
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
@click.option("--nprobe", type=click.IntRange(1, MAX_NPROBE), default=None, envvar="RETRIEVAL_NPROBE", show_envvar=True,
              help="IVF lists searched per query. [default: as index-images recorded it, tuned for recall]")
@click.option("--ef-search", type=click.IntRange(1, MAX_EF_SEARCH), default=None, envvar="RETRIEVAL_EF_SEARCH",
              show_envvar=True, help="HNSW search breadth (efSearch). [default: as index-images recorded it]")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"results": [...], "data_dir"} as JSON on stdout; for several queries {"queries": '
                   '[{"query", "results"}, ...], "data_dir"}.')
def main(query_images: tuple[Path, ...], k: int, index_dir: Path, db_url: str | None, device: str, qe: int,
         qe_alpha: float, nprobe: int | None, ef_search: int | None, as_json: bool) -> None:
    """Print the K images of the index nearest to each QUERY_IMAGE in feature space (- reads one from standard
    input: `curl -s URL | search-images -`). Several queries share one start-up (the network and the index load
    once: about 2 s for AlexNet on 2 CPU cores), each with its own list.

    The query goes through exactly the network the index was built with. Distances are L2
    distances between feature vectors (0 for an identical image). Options can also be set by
    environment variables (SEARCH_IMAGES_K, ...; see docs/configuration.md).

    Exit status: 0 done, 2 a query that cannot be used (no image, no regular file; nothing is searched then) or an
    index that cannot be searched (none there, a damaged catalog), 1 a full disk (one line: what to free), 130
    interrupted.
    """
    setup_logging(False)
    from retrieval.images.decode import ImageDecodeError

    if sum(str(q) == "-" for q in query_images) > 1:
        raise UserError("- (standard input) can be given once")
    stdin = _read_stdin() if any(str(q) == "-" for q in query_images) else None
    for query_image in query_images:   # a file that is no image is refused before torch, FAISS and the network load
        _query_bytes(query_image, stdin, check=True)
    from retrieval.search.expansion import QueryExpansion

    found = []
    from retrieval.vectors.faiss_parts import SearchParams

    with querying(open_index(index_dir, db_url, device, search_params=SearchParams(nprobe, ef_search)), index_dir,
                  db_url) as index:
        for query_image in query_images:
            try:
                hits, _ = index.search_image(_query_bytes(query_image, stdin), k,
                                             expansion=QueryExpansion(qe, qe_alpha))
            except ImageDecodeError as exc:
                raise UserError(f"cannot use {_shown(query_image)} as a query: {exc}") from exc
            found.append((query_image, hits))
        data_dir = str(index.data_dir)   # the hits' paths are relative to it
    if _being_updated(index_dir):
        click.echo("note: an index-images run is updating this index now: images it has not reached yet are not "
                   "searched", err=True)
    if as_json:
        def listed(hits: list) -> list[dict]:
            return [{"id": h.id, "path": display_name(h.path), "label": None if h.label is None else display_name(h.label),
                     "distance": round(h.distance, 6),   # as the API rounds it
                     "file": display_name(os.path.join(data_dir, h.path))} for h in hits]   # usable from anywhere
        doc = {"results": listed(found[0][1])} if len(found) == 1 else \
            {"queries": [{"query": display_name(str(q)), "results": listed(hits)} for q, hits in found]}
        click.echo(json.dumps({**doc, "data_dir": display_name(data_dir)}))
        return
    for n, (query_image, hits) in enumerate(found):
        if len(found) > 1:
            click.echo(f"{'' if n == 0 else chr(10)}query: {terminal_name(_shown(query_image))}")
        if not hits:
            click.echo("the index is empty: no neighbours")
            continue
        click.echo(f"{'rank':>4}  {'distance':>8}  {'label':<16}  path")
        for rank, h in enumerate(hits, 1):
            click.echo(f"{rank:>4}  {h.distance:>8.4f}  {terminal_name(h.label or '-'):<16}  {terminal_name(h.path)}")


def _shown(query_image: Path) -> str:
    return "the image on standard input" if str(query_image) == "-" else str(query_image)


def _query_bytes(query_image: Path, stdin: bytes | None, *, check: bool = False) -> bytes:
    """A query's bytes (stdin's for -); check: also decoded, to refuse a file that is no image before the network
    loads. Raises UserError."""
    from retrieval.files import open_regular
    from retrieval.images.decode import ImageDecodeError, Preprocessing, decode_for_model

    try:
        if str(query_image) == "-":
            data = stdin or b""
        else:
            with open_regular(query_image) as f:   # a named pipe or a device is refused, not waited on or read forever
                data = f.read()
        if check:
            decode_for_model(data, Preprocessing())
        return data
    except ImageDecodeError as exc:
        raise UserError(f"cannot use {_shown(query_image)} as a query: {exc}") from exc
    except OSError as exc:
        raise UserError(f"cannot read {_shown(query_image)}: {exc.strerror or exc}") from exc


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

if __name__ == "__main__":   # python -m commands.search_images ...: as the console script (it did nothing, exit 0)
    search_images_entry()
