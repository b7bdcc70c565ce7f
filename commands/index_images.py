"""`index-images DATA_DIR`: build or update the index of a folder of images (the pipeline in indexer/)."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import click

from retrieval.names import DECODES, FC_DIM, INPUT_NORMS, LAYERS, MAX_EF_SEARCH, MAX_NPROBE, MODEL_NAMES, MODEL_PARAMETERS, VIEWS, feature_dim

from commands.options import (Busy, Command, FloatRange, PathArg, UserError, batch_size_value, command_settings,
                              db_url_option, exit_without_teardown, full_disk_error, index_dir_option, permission_denied,
                              privilege_error, setup_logging)

# Nothing heavy at module level: --help and usage errors answer at once. The job imports torch and
# FAISS itself, only when there is work for the network.

FEATURE_DIM = FC_DIM   # the largest: fc6 and fc7 of both backbones (pooled conv5 layers have 256 or 512)
SUMMARY_PREFIX = "summary "   # index-images' last line: this, then the JSON object --json prints alone


def whiten_dim_value(_ctx: click.Context | None, _param: click.Parameter | None, value: str | None) -> int | str | None:
    """--whiten-dim's callback: a number of dimensions from 1 to 4096, "auto", or None (not given)."""
    if value is None:
        return None
    value = value.strip().lower()
    if value != "auto" and not (value.isascii() and value.isdigit() and 1 <= int(value) <= 4096):
        raise click.BadParameter(f"takes a number of dimensions from 1 to 4096 or auto, not {value!r}")
    return value if value == "auto" else int(value)


@click.command(cls=Command, context_settings=command_settings("index-images"))
@click.argument("data_dir", type=PathArg(exists=True, file_okay=False, path_type=Path, resolve_path=True))
@index_dir_option
@db_url_option
@click.option("--model", type=click.Choice(MODEL_NAMES), default=None,
              help="Backbone network. [default: alexnet, or what the index was built with]")
@click.option("--layer", type=click.Choice(LAYERS), default=None,
              help="Feature layer: fc6 or fc7 (4096-d, after the ReLU), or the last conv block (pool5's input) pooled "
                   "to one L2-normalised vector of its channels (256-d on alexnet, 512-d on vgg16): conv5-mac (max), "
                   "conv5-spoc (average), conv5-gem (generalised mean, p=3), conv5-rmac (regional max over three "
                   "scales of regions). Recorded in the index. [default: fc7, or the index's]")
@click.option("--views", type=click.Choice(VIEWS), default=None,
              help="Average each image's descriptor over views of it, when indexing and for every query: single "
                   "(the image alone), flip (the image and its mirror: a mirrored copy finds its original; about "
                   "twice the network's time), flip+scales (both at 0.71, 1 and 1.41 times the size: 4 to 7 times "
                   "the time). Recorded in the index. [default: single, or the index's]")
@click.option("--input-norm", type=click.Choice(INPUT_NORMS), default=None,
              help="How each image is normalised before the network: weights (by the weights' own mean and "
                   "standard deviation, as they were trained) or image (by the image's own, per channel: a "
                   "brighter, darker, flatter or colour-cast copy finds its original; loses colour cues, so "
                   "classes that differ by colour are told apart less well). Recorded in the index. "
                   "[default: weights, or the index's]")
@click.option("--regions/--no-regions", default=None,
              help="Also store the vectors of five regions of each image (its four corners and its centre, 80% of "
                   "each side, through the same network and views) and score each image by its nearest vector, its "
                   "own or a region's: a cropped copy finds its original (copy recall@1 0.95 -> 0.97-0.98 with "
                   "--views flip --input-norm image); about 5 times the indexing time, 6 times the stored vectors. "
                   "Searched exactly (index type Flat or auto, whitened or not); not with --ray or --decode device. "
                   "Recorded in the index. [default: no-regions, or the index's]")
@click.option("--weights", default=None, metavar="imagenet|random|PATH",
              help="ImageNet weights (downloaded or from the torch hub cache), seeded random weights "
                   "(kept in the index folder), or a state dict file. [default: imagenet, or the index's]")
@click.option("--seed", type=int, default=None, help="Seed for --weights random. [default: 0, or the index's]")
@click.option("--normalize/--no-normalize", default=None,
              help="L2-normalise the vectors (recorded in the index). [default: normalize]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the network runs; auto picks a CUDA GPU when there is one.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="The network's arithmetic: bf16 (CUDA, or a CPU with AVX512-BF16 or AMX-BF16; features within "
                   "cosine 0.999 of fp32) or fp32. auto: the index's recorded one; for a new index bf16 on CUDA, on "
                   "a CPU with bf16 units whichever a start-up probe finds faster, else fp32. Recorded in the index.")
@click.option("--decode", type=click.Choice(DECODES), default="auto", show_default=True,
              help="Where JPEGs are decoded: by the decoding workers (Pillow, reduced in the decoder to about the "
                   "network's size), or on the network's device (torchvision; nvJPEG on a GPU), falling back to "
                   "the workers' decoder per file. auto: on a GPU both, sharing the JPEGs as each keeps up; "
                   "on the CPU the workers.")
@click.option("--batch-size", default="auto", show_default=True, metavar="N|auto", callback=batch_size_value,
              help="Images per forward pass and per catalog transaction. auto: on CUDA the largest batch the free "
                   "GPU memory holds (with a safety margin; -v logs the choice), on the CPU 32.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Decoding processes (0 decodes in the main process). When the network runs on a GPU (--device "
                   "cuda, or auto with an NVIDIA GPU present) the main process mostly waits on it, so every core "
                   "decodes. [default: one per core, at most 8, or 32 on a GPU]")
@click.option("--max-file-mb", type=FloatRange(min=0, min_open=True), default=512, show_default=True,
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
@click.option("--nprobe", type=click.IntRange(1, MAX_NPROBE), default=None, envvar="RETRIEVAL_NPROBE", show_envvar=True,
              help="IVF lists searched per query. [default: the smallest giving 1-recall@10 >= 0.95 on the recall "
                   "sample, or the index's]")
@click.option("--ef-search", type=click.IntRange(1, MAX_EF_SEARCH), default=None, envvar="RETRIEVAL_EF_SEARCH", show_envvar=True,
              help="HNSW search breadth (efSearch). [default: tuned like --nprobe, or the index's]")
@click.option("--recall-queries", type=click.IntRange(min=1), default=None,
              help="Held-out catalog vectors whose neighbours are checked against exact search after each build "
                   "(left out of training). [default: 1000, or the index's]")
@click.option("--auto-flat-max", type=click.IntRange(min=0), default=None,
              help="auto keeps exact Flat up to this many images. [default: 50000, or the index's]")
@click.option("--whiten/--no-whiten", default=None,
              help="PCA-whiten the vectors in the FAISS index (centre, rotate, scale by eigenvalue^-1/2, L2-normalise), "
                   "learned on the collection, applied to every query; the catalog keeps the raw vectors. Waits for "
                   "128 images (with --whiten-dim N: 1.25 N, at most 40). [default: whiten a new "
                   "index, but not one of a weights file (fine-tune's output); an existing one keeps what it recorded]")
@click.option("--whiten-dim", default=None, metavar="N|auto", callback=whiten_dim_value,
              help="Dimensions after whitening. auto: a power of two up to a quarter of the images, at most 256 "
                   "(more dimensions than that make kNN classification worse). N is kept while there are 1.25 N "
                   "images; with fewer, the largest power of two they allow. [default: auto, or the index's]")
@click.option("--dba", type=click.IntRange(0, 50), default=None, metavar="N",
              help="Database-side augmentation: store each image's vector averaged with its N nearest (weighted by "
                   "similarity^3), recomputed whenever the collection changes; 0 turns it off. [default: 0, or the "
                   "index's]")
@click.option("--check", is_flag=True,
              help="Verify the index instead of updating it: the catalog file (SQLite quick_check), every vector "
                   "against its checksum, the FAISS file against the catalog. Prints what it found and what to do; "
                   "exit 1 when something is wrong. Damaged vectors are marked for the next run to extract again, "
                   "and rows written before checksums existed get theirs (nothing else is written).")
@click.option("--data-moved", is_flag=True,
              help="The folder the index was made of is gone and DATA_DIR is it, moved: point the index at DATA_DIR "
                   "(checked: its images at their paths, sizes and times, a few by their bytes) instead of refusing.")
@click.option("--import-sqlite", is_flag=True,
              help="With --db-url naming an empty database: copy the index folder's SQLite catalog (catalog.db) into "
                   "it, vectors and ids as they are (nothing is extracted again), then set catalog.db aside as "
                   "catalog.db.imported.")
@click.option("--list-changes", is_flag=True,
              help='List each file added, changed, moved and removed (with --json: "changes").')
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary object on stdout.")
@click.option("-v", "--verbose", is_flag=True, help="Log each skipped file and other details.")
def main(data_dir: Path, index_dir: Path, db_url: str | None, model, layer, views, input_norm, regions, weights, seed, normalize, device, precision, decode, batch_size, workers,  # noqa: ANN001
         max_file_mb: float, ray_address: str | None, index_type: str | None, rebuild_index: bool, nprobe: int | None,
         ef_search: int | None, recall_queries: int | None, auto_flat_max: int | None, whiten: bool | None,
         whiten_dim: int | None, dba: int | None, check: bool, data_moved: bool, import_sqlite: bool, list_changes: bool, as_json: bool,
         verbose: bool) -> None:
    """Index (or update the index of) the images in DATA_DIR.

    Walks DATA_DIR recursively (JPEG, PNG, WebP, BMP, GIF, TIFF), labels each image by its first
    folder level (DATA_DIR/cats/x.jpg is labelled "cats"), extracts CNN features and stores them in
    a FAISS index with an SQLite catalog. Re-runs are incremental: unchanged files cost a stat,
    changed files are re-extracted, removed files leave the index. Unreadable files are skipped and
    listed. Safe to interrupt at any point: run it again to finish.

    Where stdout is not a terminal, the last line printed is machine-readable: "summary " and the JSON object
    that --json prints alone (indexed, unchanged, removed, skipped, total, seconds, images_per_second, ...). Every option can also
    be set by an environment variable (INDEX_IMAGES_BATCH_SIZE, ...; see docs/configuration.md).

    Exit status: 0 done (even with skipped files), 2 usage or configuration error (a damaged catalog or a
    read-only index folder included), 75 another run is updating the index (try again later), 1 unexpected failure or a full disk (one line: how much to free; nothing
    committed is lost), 130 interrupted (Ctrl-C: every finished batch is kept; 143 for SIGTERM, the same way); with
    --check, 0 sound, 1 something to repair, 75 a run is writing it now.
    """
    setup_logging(verbose, quiet=as_json)
    from sqlalchemy.exc import SQLAlchemyError

    from retrieval.catalog import (catalog_sqlite_file, damaged_message, damaged_reason, database_full_message,
                                   db_error_reason, mask_url)
    from retrieval.files import READ_ONLY, disk_trouble, no_space_message

    def damaged(exc: BaseException) -> UserError | None:
        reason = damaged_reason(exc)
        if reason is None:
            return None
        where = catalog_sqlite_file(index_dir, db_url)
        return UserError(damaged_message(str(where) if where else "database", reason, str(data_dir)))

    if check:
        _check(data_dir, index_dir, db_url, as_json, damaged)
    from retrieval.vectors.index_types import IndexTypeConfig

    from indexer.locks import IndexBusy
    from indexer.config import DecoderCrashed
    from indexer.run import ConfigError, JobConfig, run_index

    vector_index = IndexTypeConfig(index_type=index_type, flat_max=auto_flat_max, nprobe=nprobe, ef_search=ef_search,
                                   recall_queries=recall_queries, rebuild=rebuild_index, whiten=whiten,
                                   whiten_dim=whiten_dim, dba=dba)
    from retrieval.images.preprocessing import REGION_COUNT

    try:   # JobConfig checks what click's types do not (the FAISS type), before any work
        cfg = JobConfig(data_dir=data_dir, index_dir=index_dir, db_url=db_url, model=model, layer=layer, views=views,
                        input_norm=input_norm, regions=None if regions is None else REGION_COUNT * regions,
                        weights=weights, normalize=normalize, seed=seed, device=device, precision=precision,
                        decode=decode, batch_size=batch_size, workers=workers,
                        max_file_bytes=int(max_file_mb * 2**20), progress=not as_json, ray=ray_address,
                        list_changes=list_changes, data_moved=data_moved, import_sqlite=import_sqlite,
                        vector_index=vector_index)
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    _check_writable(index_dir)
    try:
        # stdout carries the report only: what a library prints meanwhile goes to stderr (Ray's driver prints a
        # killed worker's "(raylet) A worker died ..." on stdout, which broke --json and the summary line)
        with contextlib.redirect_stdout(sys.stderr):
            report = run_index(cfg, on_extractor=None if as_json else _announce,
                               on_cluster=None if as_json else lambda line: click.echo(line, err=True))
    except IndexBusy as exc:
        raise Busy(str(exc)) from None
    except ConfigError as exc:   # (a first run's folder is removed again: indexer.run)
        raise UserError(str(exc)) from exc
    except DecoderCrashed as exc:
        click.echo(f"error: {exc}\nevery committed batch is kept: move the file that crashes the decoder out of the data "
                   "folder (or give the nodes more memory) and run the same command again.", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        held = _images_held(index_dir, db_url)
        click.echo(f"\ninterrupted: whatever was indexed before it is saved{held}; run the same command again to "
                   "finish.", err=True)
        sys.exit(130)
    except Exception as exc:   # a full disk or a read-only folder, wherever it surfaced (weights, catalog, FAISS): one line
        trouble = disk_trouble(exc)
        if trouble == READ_ONLY:
            raise UserError(_read_only_message(index_dir)) from None
        if (denied := permission_denied(exc)) is not None:   # a file in the index folder this user may not write
            raise UserError(f"{denied}; change its permissions or pass another --index-dir") from None
        if trouble is not None and db_url is not None and catalog_sqlite_file(index_dir, db_url) is None \
                and isinstance(exc, SQLAlchemyError):   # the database server's disk, not the index folder's
            click.echo(f"error: {database_full_message(db_url, exc)}", err=True)
            sys.exit(1)
        if trouble is not None:
            click.echo(f"error: {no_space_message(index_dir, _space_needed(data_dir, index_dir, model, weights))}", err=True)
            sys.exit(1)
        if not isinstance(exc, SQLAlchemyError):
            raise
        if (user_error := damaged(exc) or privilege_error(exc, db_url)) is not None:   # running it again cannot help
            raise user_error from None
        # the database failed mid-run (server gone): committed batches stay
        click.echo(f"error: the catalog database {mask_url(db_url)} failed: {db_error_reason(exc, db_url)}\n"
                   "every committed batch is kept: run the same command again to finish.", err=True)
        sys.exit(1)
    if as_json:
        click.echo(summary_json(report))
        return
    _print_report(report, verbose, rebuilt=rebuild_index)
    if report.total == 0 and not report.skipped and not report.removed:   # a typo'd or wrong folder, most likely
        from retrieval.images.scan import IMAGE_EXTENSIONS
        from retrieval.system import display_name
        click.echo(f"note: no image files in {display_name(str(data_dir))} or its subfolders ({' '.join(sorted(IMAGE_EXTENSIONS))}): "
                   "the index is empty", err=True)
    if whiten and (report.vector_index or {}).get("whiten_waits_for"):
        click.echo(f"note: {_whiten_waits(report.vector_index)}", err=True)
    if report.indexed and not report.unchanged and index_dir.resolve().is_relative_to(data_dir.resolve()):
        # a first run from inside the photos' folder (`cd photos && index-images .`): ./index landed among them
        from retrieval.system import display_name
        click.echo(f"note: the index folder {display_name(str(index_dir))} is inside the data folder (its images are "
                   "left out; it holds the network's weights, hundreds of MB): to keep the photos' folder to photos, "
                   "index into a folder beside it instead (--index-dir ../index)", err=True)
    if report.indexed and (report.network or {}).get("weights") == "random":   # e.g. an index make demo made offline
        click.echo("note: this index's network has seeded random weights: they find copies and pictures alike in "
                   "colour, shape and texture, not pictures of the same kind of thing; for that, index into a new "
                   "folder with --weights imagenet (docs/indexing.md)", err=True)
    if not sys.stdout.isatty():   # a pipe or a log file: the machine-readable last line (a person has read it above)
        click.echo(f"{SUMMARY_PREFIX}{summary_json(report)}")


def _check(data_dir: Path, index_dir: Path, db_url: str | None, as_json: bool, damaged) -> None:  # noqa: ANN001
    """index-images --check: verify, print the findings and what to do, exit 0 (sound) or 1."""
    from sqlalchemy.exc import SQLAlchemyError

    from retrieval.catalog import CatalogUnavailable, db_error_reason

    from indexer.check import check_index, describe

    from indexer.config import ConfigError
    from indexer.locks import IndexBusy

    try:
        report = check_index(data_dir, index_dir, db_url)
    except IndexBusy as exc:
        raise Busy(str(exc)) from None
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    except CatalogUnavailable as exc:
        raise UserError(str(exc)) from None
    except SQLAlchemyError as exc:   # a full disk too: SQLite cannot make its shared-memory file ("disk I/O error")
        if (user_error := damaged(exc) or full_disk_error(exc, index_dir, db_url)) is not None:
            raise user_error from None
        raise UserError(f"the catalog cannot be read: {db_error_reason(exc, db_url)}") from None
    click.echo(json.dumps(report) if as_json else describe(report))
    sys.exit(0 if report["ok"] else 1)


def _check_writable(index_dir: Path) -> None:
    """A read-only index folder (or the read-only file system it would be made on), or a folder this user may not
    make it in: one line, exit 2, before any work."""
    from retrieval.files import is_read_only
    if is_read_only(index_dir) or (index_dir.is_dir() and not os.access(index_dir, os.W_OK | os.X_OK)):
        raise UserError(_read_only_message(index_dir))
    existing = index_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == index_dir:
        if not index_dir.is_dir():
            raise UserError(f"the index folder {index_dir} is a file, not a folder; pass another --index-dir")
        return
    if not existing.is_dir():
        raise UserError(f"cannot make the index folder {index_dir}: {existing} is a file, not a folder; "
                        "pass another --index-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot make the index folder {index_dir}: this user may not write in {existing}; "
                        "change its permissions or pass another --index-dir")


def _read_only_message(index_dir: Path) -> str:
    from retrieval.files import device_words, is_read_only
    if is_read_only(index_dir):
        return (f"the index folder {index_dir} is read-only: {device_words(index_dir)} is mounted read-only; "
                "remount it read-write or pass another --index-dir")
    return (f"the index folder {index_dir} is read-only: this user may not write in it; "
            "change its permissions or pass another --index-dir")


def _space_needed(data_dir: Path, index_dir: Path, model: str | None, weights: str | None) -> int:
    """About the free space the run still needs: the random weights when they are still to be written, the new FAISS
    file (written whole next to the old one), the catalog rows still to commit (a vector each, and the WAL), and a
    margin. An estimate, made only once the disk is full (a scan of DATA_DIR, as the run made)."""
    import sqlite3

    from retrieval.catalog.db import CATALOG_FILE
    from retrieval.files import SPACE_MARGIN
    from retrieval.images.scan import scan_folder
    from retrieval.names import FAISS_FILE, random_weights_file
    needed = SPACE_MARGIN
    if weights == "random" and not random_weights_file(index_dir, model or "alexnet").exists():
        needed += MODEL_PARAMETERS.get(model or "alexnet", 0) * 4   # a state dict file
    vector = FEATURE_DIM * 4
    try:
        total = len(scan_folder(data_dir, exclude=[index_dir], skip_folders_holding=CATALOG_FILE).images)
    except OSError:
        return needed
    committed = 0
    if (index_dir / CATALOG_FILE).is_file():
        try:
            with sqlite3.connect(f"file:{index_dir / CATALOG_FILE}?mode=ro", uri=True, timeout=1) as db:
                committed = db.execute("SELECT count(*) FROM images").fetchone()[0]
        except sqlite3.Error:
            pass
    faiss_file = index_dir / FAISS_FILE
    if committed and faiss_file.is_file():   # whitened or compressed vectors take a fraction of the raw ones' room
        new_faiss = int(faiss_file.stat().st_size * max(total, committed) / committed)
    else:
        new_faiss = total * vector
    return needed + new_faiss + int(max(0, total - committed) * vector * 1.5)


def _images_held(index_dir: Path, db_url: str | None) -> str:
    """" (1,790 images in the index now)" after an interrupted run, or "" when the catalog cannot say."""
    from retrieval.catalog import Catalog

    try:
        catalog = Catalog(index_dir, url=db_url)
        try:
            count = catalog.count()
        finally:
            catalog.close()
    except Exception:  # noqa: BLE001 - a count for the message; the interruption is what is reported
        return ""
    return f" ({count:,} image{'' if count == 1 else 's'} in the index now)"


def summary_json(report) -> str:  # noqa: ANN001 - indexer.run.RunReport
    """The run's summary as one line of JSON: what --json prints, and the human output's last line after "summary "."""
    return json.dumps(report.to_json())


def _announce(extractor) -> None:  # noqa: ANN001 - FeatureExtractor
    views = "" if extractor.views == "single" else f", {extractor.views} views averaged"
    norm = "" if extractor.preprocessing.input_norm == "weights" else ", each image normalised by its own statistics"
    click.echo(f"network: {extractor.model} {extractor.layer}{views}{norm} on {extractor.device}", err=True)


def _print_report(r, verbose: bool = False, rebuilt: bool = False) -> None:  # noqa: ANN001 - indexer.run.RunReport
    from retrieval.system import terminal_name

    rate = f", {r.images_per_second:.1f} images/s" if r.indexed else ""
    loop = r.extraction or {}
    if r.indexed and loop.get("loop_seconds"):   # start-up (imports, the network) apart: one new file is not "0.5 images/s"
        rate = f"; {loop['loop_images_per_second']:.1f} images/s after start-up"
    moved = f", moved {r.moved}" if r.moved else ""
    click.echo(f"indexed {r.indexed}, unchanged {r.unchanged}{moved}, removed {r.removed}, skipped {len(r.skipped)}; "
               f"{r.total} image{'' if r.total == 1 else 's'} in the index ({r.seconds:.1f} s{rate})")
    for word, paths in (r.changes or {}).items():   # --list-changes
        for path in paths:
            shown = " -> ".join(map(terminal_name, path)) if word == "moved" else terminal_name(path)
            click.echo(f"  {word} {shown}")
    for s in r.skipped:
        click.echo(f"  skipped {terminal_name(s['path'])}: {s['reason']}")
    if r.moved:
        click.echo(f"  {r.moved} moved or renamed in the folder (the same bytes): kept with their new path and label, not "
                   "extracted again")
    if r.restamped:
        click.echo(f"  {r.restamped} of the unchanged have a new modification time but the same bytes: kept as they "
                   "were, not extracted again")
    if r.unreadable_formats:
        counted = ", ".join(f"{n} {ext}" for ext, n in r.unreadable_formats.items())
        click.echo(f"  not indexed: {counted} (photo formats this program does not read: convert them to JPEG to "
                   "index them)")
    for f in r.folders:
        click.echo(f"  folder left out: {terminal_name(f['path'])}/: {terminal_name(f['reason'])}")
    if r.extraction:
        x = r.extraction
        stages = ", ".join(f"{stage} {t:.1f} s" for stage, t in x["stage_seconds"].items())
        click.echo(f"network on {x['device']} in {x['precision']}, batches of {x['batch_size']}; JPEGs decoded by "
                   f"{x['decode']}" + (f"; {stages}" if verbose else ""))
    for repair in r.repairs:
        click.echo(repair)
    if r.vector_index:
        click.echo(f"FAISS index{' (rebuilt from the catalog, as asked)' if rebuilt else ''}: "
                   f"{describe_vector_index(r.vector_index)}")
        if (low := low_recall_note(r.vector_index)) is not None:
            click.echo(low)
        if r.indexed and not (r.vector_index.get("whiten") or {}).get("on") and not r.vector_index.get("whitened_dim") \
                and r.network and r.network["weights"] not in ("imagenet", "random"):
            click.echo("not whitened: an index of a weights file (fine-tune's output) searches fc7 as the fine-tune "
                       "shaped it, where whitening lost most of its gain (docs/fine-tuning.md); --whiten to whiten it")
        if (unused := unused_search_params_note(r.vector_index)) is not None:
            click.echo(unused)
        if r.vector_index.get("regions"):
            regions = r.vector_index["regions"]
            click.echo(f"regional vectors: {regions['count']} ({regions['per_image']} per image), searched exactly "
                       "together with the images' own vectors")


def _whiten_waits(info: dict) -> str:
    """Why --whiten did not whiten yet, and what would (a smaller --whiten-dim, or more images)."""
    from retrieval.vectors.whitening import WHITEN_MIN_DIM, min_whiten_vectors

    count, dim = info.get("count", 0), WHITEN_MIN_DIM
    while dim > 8 and min_whiten_vectors(dim) > count:   # the most dimensions an explicit --whiten-dim has here
        dim //= 2                                          # (not under 8: a handful of images has little to learn)
    line = (f"--whiten waits for {info['whiten_waits_for']} images (the index has {count}): its vectors stay raw until "
            "then, and the run that reaches it whitens them")
    if min_whiten_vectors(dim) <= count < info["whiten_waits_for"]:
        return line + f"; --whiten-dim {dim} whitens these {count} now"
    return line


def _uses(factory: str, setting: str) -> bool:
    """Whether an index of this FAISS type has a use for the search setting (nprobe, ef_search)."""
    return {"nprobe": "IVF" in factory, "ef_search": "HNSW" in factory}.get(setting, True)


def unused_search_params_note(info: dict) -> str | None:
    """A line for search settings asked for (--nprobe, --ef-search) that the index's type has no use for now: they
    are kept, and apply once it is a type that has (auto moves to IVF past --auto-flat-max)."""
    factory = info.get("factory") or ""
    unused = [name for name in (info.get("requested_search_params") or {}) if not _uses(factory, name)]
    if not unused:
        return None
    options = " and ".join({"nprobe": "--nprobe", "ef_search": "--ef-search"}.get(name, name) for name in unused)
    kinds = " or ".join({"nprobe": "IVF", "ef_search": "HNSW"}.get(name, name) for name in unused)
    it = "them" if len(unused) > 1 else "it"
    return f"note: {options} kept for when the index is a type that uses {it} ({kinds}); {factory} has no use for {it}"


def low_recall_note(info: dict) -> str | None:
    """A line when search settings that were asked for (--nprobe, --ef-search, or RETRIEVAL_NPROBE meant for a
    server) give less than the recall the tuning aims for; else None."""
    from retrieval.vectors.index_types import RECALL_TARGET

    asked, used = info.get("requested_search_params") or {}, info.get("search_params") or {}
    asked = {k: v for k, v in asked.items() if _uses(info.get("factory") or "", k)}   # (the others: tuned as if not)
    measured = next((m for m in (info.get("recall") or {}).get("results", []) if m["search_params"] == used), None)
    if not asked or measured is None or measured["1-recall@10"] >= RECALL_TARGET:
        return None
    given = " and ".join(f"--{k.replace('_', '-')} {v}" for k, v in asked.items())
    return (f"note: {given} (asked for on the command line, or by RETRIEVAL_NPROBE / RETRIEVAL_EF_SEARCH) finds "
            f"{measured['1-recall@10']:.3f} of the true nearest in the first 10, under the {RECALL_TARGET} the tuning "
            "aims for; leave it out (and unset the variable) to tune it, or keep it for speed")


def describe_vector_index(info: dict) -> str:
    """One line: the type, and for an approximate one its search settings and the recall they gave."""
    if info.get("whiten_waits_for"):
        whitening = (f"; whitening waits for {info['whiten_waits_for']} images (has {info.get('count', 0)}), "
                     "raw vectors until then")
    else:
        whitening = ""
    from retrieval.vectors.index_types import min_train_vectors
    from retrieval.vectors.whitening import split_whitening
    requested = info.get("requested") or "auto"
    if requested.lower() not in ("auto", "flat") and requested != info["factory"] \
            and split_whitening(info["factory"])[1] != requested:   # (an explicit PCAW... type is built as asked)
        whitening += (f"; {requested} waits for {min_train_vectors(requested)} images to train "
                      f"(has {info.get('count', 0)}), exact search until then")
    if waits := info.get("auto_waits_for"):   # past --auto-flat-max, too few images to train auto's type yet
        whitening += (f"; auto's {waits['factory']} (past --auto-flat-max {info.get('flat_max')}) waits for "
                      f"{waits['images']} images to train (has {info.get('count', 0)}), exact search until then")
    if info.get("exact"):
        return f"{info['factory']} (exact{whitening})"
    if split_whitening(info["factory"])[1].lower() == "flat":   # whitened, searched exactly in the whitened space
        return f"{info['factory']} (exact in the whitened space{whitening})"
    params = ", ".join(f"{k} {v}" for k, v in (info.get("search_params") or {}).items())
    line = f"{info['factory']} ({info['requested']}{'; ' + params if params else ''}{whitening})"
    recall = info.get("recall")
    measured = next((m for m in (recall or {}).get("results", [])
                     if m["search_params"] == (info.get("search_params") or {})), None)
    if measured is None:
        return line + "; recall not measured"
    space = " (in the whitened space)" if info.get("whitened_dim") else ""
    queries = (f"{recall['queries']} held-out queries" if recall.get("held_out", True) else
               f"{recall['queries']} queries (trained on too: too few images to hold them out)")
    return (line + f"; on {queries}{space}: 1-recall@1 {measured['1-recall@1']:.3f}, "
                   f"1-recall@10 {measured['1-recall@10']:.3f}, 10-recall@10 {measured['10-recall@10']:.3f}")


index_images_entry = exit_without_teardown(main)

if __name__ == "__main__":   # python -m commands.index_images ...: as the console script (it did nothing, exit 0)
    index_images_entry()
