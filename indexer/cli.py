"""Command lines: `index-images DATA_DIR` (build or update an index) and `search-images QUERY` (query it)."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable

import click

from retrieval.names import DB_URL_ENV, INDEX_DIR_ENV, LAYERS, MODEL_NAMES

FEATURE_DIM = 4096   # fc6 and fc7 of both backbones
from retrieval.system import display_name

from .config_table import command_settings

# Nothing heavy at module level: --help and usage errors answer at once. The job imports torch and
# FAISS itself, only when there is work for the network.

SUMMARY_PREFIX = "summary "   # index-images' last line: this, then the JSON object --json prints alone


class UserError(click.ClickException):
    """A problem the user can fix; exit status 2, message without a traceback."""
    exit_code = 2


def index_dir_option(f):  # noqa: ANN001, ANN201 - click decorator
    return click.option("--index-dir", type=click.Path(file_okay=False, path_type=Path, resolve_path=True), default="index",
                        envvar=INDEX_DIR_ENV, show_default=True, show_envvar=True,
                        help="Folder holding the index (catalog.db, vectors.faiss).")(f)


def db_url_option(f):  # noqa: ANN001, ANN201 - click decorator
    return click.option("--db-url", default=None, envvar=DB_URL_ENV, show_envvar=True, metavar="URL",
                        help="SQLAlchemy URL of the catalog, e.g. postgresql://USER:PASSWORD@HOST:5432/DB to share it "
                             "between hosts (the FAISS file stays in the index folder). [default: SQLite catalog.db "
                             "in the index folder]")(f)


def setup_logging(verbose: bool, *, quiet: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if not quiet:  # the batch size choice and its reason are always worth a line
        logging.getLogger("indexer.batch_size").setLevel(logging.INFO)


def parse_batch_size(value: str) -> int | str:
    """A positive whole number, or "auto" (chosen from the free GPU memory; 32 on the CPU)."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a whole number or 'auto'", param_hint="'--batch-size'") from None
    if n < 1:
        raise click.BadParameter("must be at least 1", param_hint="'--batch-size'")
    return n


@click.command(context_settings=command_settings("index-images"))
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path, resolve_path=True))
@index_dir_option
@db_url_option
@click.option("--model", type=click.Choice(MODEL_NAMES), default=None,
              help="Backbone network. [default: alexnet, or what the index was built with]")
@click.option("--layer", type=click.Choice(LAYERS), default=None,
              help="Feature layer, taken after its ReLU. [default: fc7, or the index's]")
@click.option("--weights", default=None, metavar="imagenet|random|PATH",
              help="ImageNet weights (downloaded or from the torch hub cache), seeded random weights "
                   "(kept in the index folder), or a state dict file. [default: imagenet, or the index's]")
@click.option("--seed", type=int, default=None, help="Seed for --weights random. [default: 0, or the index's]")
@click.option("--normalize/--no-normalize", default=None,
              help="L2-normalise the vectors (recorded in the index). [default: normalize]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the network runs; auto picks a CUDA GPU when there is one.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="The network's arithmetic: bf16 (CUDA only; features within cosine 0.999 of fp32, about twice as "
                   "fast) or fp32. auto: bf16 on CUDA, fp32 on the CPU. Recorded in the index.")
@click.option("--decode", type=click.Choice(["auto", "workers", "device"]), default="auto", show_default=True,
              help="Where JPEGs are decoded: by the decoding workers (Pillow, reduced in the decoder to about the "
                   "network's size), or on the network's device (torchvision; nvJPEG on a GPU), falling back to "
                   "the workers' decoder per file. auto: on a GPU both, sharing the JPEGs as each keeps up; "
                   "on the CPU the workers.")
@click.option("--batch-size", default="auto", show_default=True, metavar="N|auto",
              help="Images per forward pass and per catalog transaction. auto: on CUDA the largest batch the free "
                   "GPU memory holds (with a safety margin; -v logs the choice), on the CPU 32.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Decoding processes (0 decodes in the main process). When the network runs on a GPU (--device "
                   "cuda, or auto with an NVIDIA GPU present) the main process mostly waits on it, so every core "
                   "decodes. [default: one per core, at most 8, or 32 on a GPU]")
@click.option("--max-file-mb", type=click.FloatRange(min=0, min_open=True), default=512, show_default=True,
              help="Files larger than this are skipped without being read.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Decode and run the network on a Ray cluster (pip install '.[ray]'): ADDRESS (auto, HOST:PORT, "
                   "ray://HOST:PORT) joins a running one; without ADDRESS, $RAY_ADDRESS or else a new local one. "
                   "This process plans and writes. Put it after DATA_DIR.")
@click.option("--index-type", default=None, metavar="auto|FACTORY",
              help="FAISS index type: a faiss.index_factory string (Flat, PCAR256,IVF1024,PQ64, HNSW32, ...) or auto: "
                   "exact Flat up to --auto-flat-max images, a trained PCA+IVF+PQ index above. Another type than the "
                   "index's is rebuilt from the catalog, without the network. [default: auto, or the index's]")
@click.option("--rebuild-index", is_flag=True,
              help="Rebuild (and retrain) the FAISS file from the catalog's vectors, without the network.")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, envvar="RETRIEVAL_NPROBE", show_envvar=True,
              help="IVF lists searched per query. [default: the smallest giving 1-recall@10 >= 0.95 on the recall "
                   "sample, or the index's]")
@click.option("--ef-search", type=click.IntRange(min=1), default=None, envvar="RETRIEVAL_EF_SEARCH", show_envvar=True,
              help="HNSW search breadth (efSearch). [default: tuned like --nprobe, or the index's]")
@click.option("--recall-queries", type=click.IntRange(min=1), default=None,
              help="Held-out catalog vectors whose neighbours are checked against exact search after each build "
                   "(left out of training). [default: 1000, or the index's]")
@click.option("--auto-flat-max", type=click.IntRange(min=0), default=None,
              help="auto keeps exact Flat up to this many images. [default: 50000, or the index's]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary object on stdout.")
@click.option("-v", "--verbose", is_flag=True, help="Log each skipped file and other details.")
def main(data_dir: Path, index_dir: Path, db_url: str | None, model, layer, weights, seed, normalize, device, precision, decode, batch_size, workers,  # noqa: ANN001
         max_file_mb: float, ray_address: str | None, index_type: str | None, rebuild_index: bool, nprobe: int | None,
         ef_search: int | None, recall_queries: int | None, auto_flat_max: int | None, as_json: bool,
         verbose: bool) -> None:
    """Index (or update the index of) the images in DATA_DIR.

    Walks DATA_DIR recursively (JPEG, PNG, WebP, BMP, GIF, TIFF), labels each image by its first
    folder level (DATA_DIR/cats/x.jpg is labelled "cats"), extracts CNN features and stores them in
    a FAISS index with an SQLite catalog. Re-runs are incremental: unchanged files cost a stat,
    changed files are re-extracted, removed files leave the index. Unreadable files are skipped and
    listed. Safe to interrupt at any point: run it again to finish.

    The last line printed is machine-readable: "summary " and the JSON object that --json prints alone
    (indexed, unchanged, removed, skipped, total, seconds, images_per_second). Every option can also
    be set by an environment variable (INDEX_IMAGES_BATCH_SIZE, ...; see the README).

    Exit status: 0 done (even with skipped files), 2 usage or configuration error, 1 unexpected failure.
    """
    setup_logging(verbose, quiet=as_json)
    from sqlalchemy.exc import SQLAlchemyError

    from retrieval.catalog import db_error_reason
    from retrieval.index_types import IndexTypeConfig

    from .job import ConfigError, JobConfig, run_index

    if index_type is not None and index_type.strip().lower() == "auto":
        index_type = "auto"
    elif index_type is not None:
        from retrieval.index_types import IndexTypeError, check_factory
        try:
            check_factory(index_type, FEATURE_DIM)   # before any work: a typo is an answer at once
        except IndexTypeError as exc:
            raise UserError(f"{exc} (--index-type)") from exc
    vector_index = IndexTypeConfig(index_type=index_type, flat_max=auto_flat_max, nprobe=nprobe, ef_search=ef_search,
                                   recall_queries=recall_queries, rebuild=rebuild_index)
    cfg = JobConfig(data_dir=data_dir, index_dir=index_dir, db_url=db_url, model=model, layer=layer, weights=weights,
                    normalize=normalize, seed=seed, device=device, precision=precision, decode=decode,
                    batch_size=parse_batch_size(batch_size),
                    workers=workers, max_file_bytes=int(max_file_mb * 2**20), progress=not as_json, ray=ray_address,
                    vector_index=vector_index)
    try:
        report = run_index(cfg, on_extractor=None if as_json else _announce,
                           on_cluster=None if as_json else lambda line: click.echo(line, err=True))
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    except KeyboardInterrupt:
        click.echo("\ninterrupted: every finished batch is saved; run the same command again to finish.", err=True)
        sys.exit(130)
    except SQLAlchemyError as exc:   # the database failed mid-run (server gone, disk full): committed batches stay
        click.echo(f"error: the catalog database failed: {db_error_reason(exc, db_url)}\n"
                   "every committed batch is kept: run the same command again to finish.", err=True)
        sys.exit(1)
    if as_json:
        click.echo(summary_json(report))
    else:
        _print_report(report)
        click.echo(f"{SUMMARY_PREFIX}{summary_json(report)}")   # the machine-readable last line


def summary_json(report) -> str:  # noqa: ANN001 - indexer.job.RunReport
    """The run's summary as one line of JSON: what --json prints, and the human output's last line after "summary "."""
    return json.dumps(report.to_json())


def _announce(extractor) -> None:  # noqa: ANN001 - FeatureExtractor
    click.echo(f"network: {extractor.model} {extractor.layer} on {extractor.device}", err=True)


def _print_report(r) -> None:  # noqa: ANN001 - indexer.job.RunReport
    click.echo(f"indexed {r.indexed}, unchanged {r.unchanged}, removed {r.removed}, skipped {len(r.skipped)}; "
               f"{r.total} images in the index ({r.seconds:.1f} s, {r.images_per_second:.1f} images/s)")
    for s in r.skipped:
        click.echo(f"  skipped {s['path']}: {s['reason']}")
    if r.extraction:
        x = r.extraction
        stages = ", ".join(f"{stage} {t:.1f} s" for stage, t in x["stage_seconds"].items())
        click.echo(f"network on {x['device']} in {x['precision']}, batches of {x['batch_size']}; JPEGs decoded by "
                   f"{x['decode']}; {stages}")
    if r.vector_index:
        click.echo(f"FAISS index: {describe_vector_index(r.vector_index)}")


def describe_vector_index(info: dict) -> str:
    """One line: the type, and for an approximate one its search settings and the recall they gave."""
    if info.get("exact"):
        return f"{info['factory']} (exact)"
    params = ", ".join(f"{k} {v}" for k, v in (info.get("search_params") or {}).items())
    line = f"{info['factory']} ({info['requested']}{'; ' + params if params else ''})"
    recall = info.get("recall")
    measured = next((m for m in (recall or {}).get("results", [])
                     if m["search_params"] == (info.get("search_params") or {})), None)
    if measured is None:
        return line + "; recall not measured"
    return (line + f"; on {recall['queries']} held-out queries: 1-recall@1 {measured['1-recall@1']:.3f}, "
                   f"1-recall@10 {measured['1-recall@10']:.3f}, 10-recall@10 {measured['10-recall@10']:.3f}")


@click.command(context_settings=command_settings("search-images"))
@click.argument("query_image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-k", type=click.IntRange(min=1), default=10, show_default=True, help="Number of neighbours.")
@index_dir_option
@db_url_option
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the network runs for the query.")
@click.option("--json", "as_json", is_flag=True, help='Print {"results": [...]} as JSON on stdout.')
def search_main(query_image: Path, k: int, index_dir: Path, db_url: str | None, device: str, as_json: bool) -> None:
    """Print the K images of the index nearest to QUERY_IMAGE in feature space.

    The query goes through exactly the network the index was built with. Distances are L2
    distances between feature vectors (0 for an identical image). Options can also be set by
    environment variables (SEARCH_IMAGES_K, ...; see the README's configuration table).
    """
    setup_logging(False)
    from retrieval.system import collector_paused

    with collector_paused():   # torch, FAISS and the network load sooner with the garbage collector off
        from retrieval.backbones import DeviceUnavailable, WeightsUnavailable
        from retrieval.images import ImageDecodeError
        from retrieval.index import ImageIndex, IndexNotFound, IndexUnavailable, WeightsMismatch

        from .job import weights_error_message

        try:
            index = ImageIndex(index_dir, db_url=db_url, device=device)
        except (IndexNotFound, IndexUnavailable, WeightsMismatch, DeviceUnavailable) as exc:
            raise UserError(str(exc)) from exc
        except WeightsUnavailable as exc:
            raise UserError(weights_error_message(exc)) from exc
    try:
        hits, _ = index.search_image(query_image.read_bytes(), k)
    except ImageDecodeError as exc:
        raise UserError(f"cannot use {query_image} as a query: {exc}") from exc
    except OSError as exc:
        raise UserError(f"cannot read {query_image}: {exc.strerror or exc}") from exc
    finally:
        index.close()
    if as_json:
        click.echo(json.dumps({"results": [{"id": h.id, "path": display_name(h.path),
                                            "label": None if h.label is None else display_name(h.label), "distance": h.distance}
                                           for h in hits]}))
        return
    if not hits:
        click.echo("the index is empty: no neighbours")
        return
    click.echo(f"{'rank':>4}  {'distance':>8}  {'label':<16}  path")
    for rank, h in enumerate(hits, 1):
        click.echo(f"{rank:>4}  {h.distance:>8.4f}  {display_name(h.label or '-'):<16}  {display_name(h.path)}")


def exit_without_teardown(command: click.Command) -> Callable[[], None]:
    """A console-script entry point for command that ends the process without Python's module teardown once
    torch is loaded: tearing down torch and torchvision costs about a second after the work is done and saved.
    (In-process callers, such as tests, call the command itself.)"""
    def entry() -> None:
        try:
            command.main()
        except SystemExit as exc:
            code = exc.code
        else:
            code = 0
        if not isinstance(code, int):   # SystemExit("message") or SystemExit(None)
            if code is not None:
                print(code, file=sys.stderr)
            code = 0 if code is None else 1
        if "torch" in sys.modules:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        sys.exit(code)
    return entry


index_images_entry = exit_without_teardown(main)
search_images_entry = exit_without_teardown(search_main)
