"""Keeping an index's FAISS file: its type chosen, trained on a catalog sample, rebuilt from the catalog, tuned, recall measured."""
from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from retrieval.catalog import Catalog
from retrieval.files import atomic_write, sample_digest
from retrieval.vectors.index_types import (AUTO, FLAT, RECALL_QUERIES, RECALL_TARGET, IndexTypeConfig, IndexTypeError, auto_factory,
                                           has_recall_to_measure, min_train_vectors, requested_dba, requested_params,
                                           requested_type, requested_whitening, seeded_samples, train_size,
                                           wanted_factory)
from retrieval.vectors.faiss_parts import SearchParams, apply_search_params, search_params_of, tuning_ladder
from retrieval.vectors.index_types import flat_max as recorded_flat_max
from retrieval.vectors.recall import K, exact_neighbours, measure, sample_vectors
from retrieval.vectors.regions import build_regions, open_regions, regions_file_state, regions_type_error
from retrieval.names import REGIONS_FILE
from retrieval.vectors.vector_index import VectorIndex, reconcile
from retrieval.search.expansion import QueryExpansion, expand
from retrieval.system import available_cores
from retrieval.vectors.whitening import min_whiten_vectors, whitening_of, split_whitening

log = logging.getLogger(__name__)

RETRAIN_GROWTH = 2   # a trained index is retrained (rebuilt from the catalog) once the collection doubles
DBA_ALPHA = 3.0      # database-side augmentation weighs each neighbour by its similarity^3 (Radenovic et al. 2018)


class IndexBuilder:
    """The writer's side of the FAISS file for one index-images run (index-images holds the index lock).

    open() loads and reconciles the file (or builds the recorded type from the catalog); grown() switches
    from Flat to a trained type as soon as the collection calls for one (so a large first run never holds
    all its vectors uncompressed); finish() rebuilds when the type should change or the collection has
    doubled since training, and measures recall; save() writes the file and then records what it holds.
    The training sample is a seeded function of the catalog's ids, so the file a run leaves does not depend
    on where an earlier run was interrupted.
    """

    def __init__(self, catalog: Catalog, path: Path, dim: int, config: IndexTypeConfig):
        self.catalog, self.path, self.dim, self.config = catalog, Path(path), dim, config
        previous = catalog.vector_index_record()
        self.previous = previous
        self.requested = requested_type(config, previous)
        self.flat_max = recorded_flat_max(config, previous)
        self.requested_params = requested_params(config, previous)
        self.whitening = requested_whitening(config, previous)
        self.dba = requested_dba(config, previous)
        self.augmented: list[tuple[np.ndarray, np.ndarray]] | None = None   # DBA's stored vectors, as the index sees them
        self.recall_queries = config.recall_queries or (previous or {}).get("recall_queries") or RECALL_QUERIES
        if self.requested != AUTO:
            VectorIndex.empty(dim, self.requested)   # raises IndexTypeError for a type FAISS cannot build
        settings = catalog.settings()
        # index-images --regions: the regional vectors' index beside the file (retrieval.vectors.regions), searched
        # exactly with the main one, which then stays exact (whitened or not) at any size
        self.region_count = settings.regions if settings is not None else 0
        self.regions_path = self.path.parent / REGIONS_FILE
        self.regions: VectorIndex | None = None
        if self.region_count and (refused := regions_type_error(self.requested)):
            raise IndexTypeError(refused)
        self.built = False        # the FAISS file was (re)built from the catalog in this run
        self.status: Callable[[str], None] = lambda _line: None   # what it is doing, for a person watching (seconds)
        self.train: dict = (previous or {}).get("train") or {"size": 0, "seed": config.seed}
        self.recall: dict | None = (previous or {}).get("recall")
        self.record: dict = previous or {}

    def wanted(self, n: int) -> str:
        flat_max = sys.maxsize if self.region_count else self.flat_max   # with regions: exact at any size
        return wanted_factory(self.requested, flat_max, n, self.dim, self.whitening)

    def open(self) -> tuple[VectorIndex, bool]:
        """-> (the index as the catalog has it, changed since the file); the regions' index in self.regions."""
        factory = (self.previous or {}).get("factory", FLAT)
        shared = self.catalog.path is None and (self.previous or {}).get("factory") not in (None, FLAT)
        if shared and (not self.path.exists() or outdated_build(self.path, self.catalog, self.previous)):
            # a folder sharing the catalog without a file, or whose file holds an earlier build (the writer retrained
            # elsewhere since): the recorded build made again (its training reproduced, as a replica's server does),
            # never a training of its own (which, recorded, made every other folder's file an earlier build) nor the
            # old file under the new record's note
            vectors = rebuilt_from_catalog(self.catalog, self.path, self.dim, reader=False)
            if vectors is None:
                return self.build(self.wanted(self.catalog.count())), True
            if self.region_count:
                self.regions, _ = open_regions(self.regions_path, self.catalog, vectors)
            return vectors, True
        vectors = VectorIndex.load(self.path, self.dim, factory=factory, vector_source=self.catalog.vectors)
        if vectors is None:   # missing, unreadable, or not the recorded type: the catalog has everything
            return self.build(self.wanted(self.catalog.count())), True
        changed = reconcile(vectors, self.catalog) or not self.path.exists()
        if self.region_count:
            self.regions, regions_changed = open_regions(self.regions_path, self.catalog, vectors)
            changed = changed or regions_changed
        return vectors, changed

    def add(self, vectors: VectorIndex, ids: np.ndarray, feats: np.ndarray, regions: np.ndarray | None) -> None:
        """One committed batch into the indexes: ids shape=(n,), feats shape=(n, dim), regions shape=(n, R, dim)."""
        vectors.add(ids, feats)
        if self.regions is not None and regions is not None and regions.size:
            self.regions.add(np.repeat(ids, regions.shape[1]), regions.reshape(-1, self.dim))   # (n * R,), (n * R, dim)

    def remove(self, vectors: VectorIndex, ids) -> None:  # noqa: ANN001 - any int sequence
        """Images gone from the catalog out of the indexes (their regions too)."""
        vectors.remove(ids)
        if self.regions is not None:
            self.regions.remove(ids)

    def build(self, factory: str, trained_on: np.ndarray | None = None) -> VectorIndex:
        """A new index of type factory from the catalog: trained on a seeded sample (queries held out), then filled.
        trained_on: the ids whose seeded sample trains it (default: all the catalog's), then all are added."""
        started = time.perf_counter()
        ids = self.catalog.ids() if trained_on is None else trained_on
        self.status(f"building the FAISS index ({factory}) from {len(ids):,} vectors")
        vectors = VectorIndex.empty(self.dim, factory, vector_source=self.catalog.vectors)
        n_train = train_size(factory, len(ids)) if not vectors.is_trained else 0
        trained_on_queries = False   # the recall queries were in the training sample (a collection too small to spare them)
        if not vectors.is_trained:
            need = min_train_vectors(factory)
            if len(ids) < need:
                raise IndexTypeError(f"index type {factory!r} needs at least {need} vectors to train; "
                                     f"the catalog has {len(ids)}")
            held_out = min(n_train, len(ids) - min(len(ids), self.recall_queries))
            if split_whitening(factory)[0] is not None:   # whitening learns the whole collection while it is small
                held_out = n_train                        # (seeded_samples then trains on everything)
            _, train_ids = seeded_samples(ids, self.recall_queries, max(held_out, need), self.config.seed)
            _, sample = sample_vectors(self.catalog.vectors(train_ids))
            log.info("training %s on %d of %d vectors", factory, len(sample), len(ids))
            vectors.train(sample)                                                       # (n_train, dim)
            del sample
            n_train = len(train_ids)
            query_ids, _ = seeded_samples(ids, self.recall_queries, 0, self.config.seed)
            trained_on_queries = bool(np.isin(query_ids, train_ids).any())
        for chunk_ids, chunk in self.catalog.vectors():
            vectors.add(chunk_ids, chunk)
        if self.region_count:
            self.regions = build_regions(self.catalog, vectors)   # in the new space (whitening learned anew)
        if self.dba:
            vectors = self.augment(vectors)
        self.built = True
        self.train = {"size": int(n_train), "count": len(ids), "seed": self.config.seed, "at": _now(),
                      "seconds": round(time.perf_counter() - started, 3),
                      "last_id": int(ids.max()) if len(ids) else 0,   # the ids it was trained among: up to this one
                      "trained_on_recall_queries": trained_on_queries}
        self.recall = None
        log.info("built %s from the catalog: %d vectors (%.1f s)", factory, len(vectors), time.perf_counter() - started)
        return vectors

    def augment(self, vectors: VectorIndex) -> VectorIndex:
        """Database-side augmentation: a copy of vectors holding each catalog vector averaged with its nearest
        self.dba others (weights similarity^DBA_ALPHA, in the index's space). Keeps what the copy holds, as the
        index sees it, in self.augmented (for the recall measurement)."""
        settings = self.catalog.settings()
        whiten = whitening_of(vectors.index)
        fresh = vectors.copy()
        fresh.index.reset()
        self.augmented = []

        def lookup(wanted: np.ndarray) -> dict[int, np.ndarray]:
            return {int(i): v for ids, vecs in self.catalog.vectors(wanted) for i, v in zip(ids, vecs)}

        for chunk_ids, chunk in self.catalog.vectors():
            distances, found = vectors.search(chunk, self.dba + 1, threads=available_cores())   # itself among them
            own = found == chunk_ids[:, None]
            order = np.argsort(own, axis=1, kind="stable")                # itself last, the others in rank order
            found, distances = np.take_along_axis(found, order, 1), np.take_along_axis(distances, order, 1)
            mixed = expand(chunk, distances, found, QueryExpansion(self.dba, DBA_ALPHA), lookup,
                           renormalize=bool(settings and settings.normalize) and whiten is None)
            fresh.add(chunk_ids, mixed)
            self.augmented.append((chunk_ids, whiten(mixed) if whiten is not None else mixed))
        log.info("database-side augmentation: each of %d vectors averaged with its %d nearest", len(fresh), self.dba)
        return fresh

    def grown(self, vectors: VectorIndex) -> VectorIndex:
        """After a batch: leave exact Flat as soon as the collection calls for a trained type (built from the catalog)."""
        if vectors.factory == FLAT and self.wanted(len(vectors)) != FLAT:
            return self.build(self.wanted(len(vectors)))
        return vectors

    def finish(self, vectors: VectorIndex, changed: bool) -> VectorIndex:
        """At the end of a run: rebuild when asked or when the type should change; measure recall when the index
        is approximate and changed (or its search settings did); set the search settings. -> the index to save."""
        target = self.wanted(len(vectors))
        trained_on = self.train.get("count") if self.train.get("size") else None
        outgrown = trained_on is not None and len(vectors) >= RETRAIN_GROWTH * trained_on
        params_changed = self.requested_params.to_json() != (self.previous or {}).get("requested_search_params", {})
        # DBA's stored vectors depend on the whole collection: recomputed whenever it changed
        stale_dba = bool(self.dba) and not self.built and (changed or params_changed or self.recall is None
                                                            or self.dba != (self.previous or {}).get("dba", 0))
        if target != vectors.factory or (self.config.rebuild and not self.built) or outgrown or stale_dba:
            if target != vectors.factory:
                log.info("FAISS index type: %s -> %s (%d vectors); rebuilding from the catalog", vectors.factory,
                            target, len(vectors))
            elif outgrown:
                log.info("the collection grew from %d to %d vectors since %s was trained: retraining", trained_on,
                         len(vectors), target)
            elif self.config.rebuild and not self.built:
                log.info("rebuilding the FAISS index (%s, %d vectors) from the catalog, as asked", target, len(vectors))
            vectors = self.build(target)
        if not self.dba and (self.previous or {}).get("dba") and not self.built:   # DBA turned off: raw vectors again
            vectors = self.build(target)
        if not has_recall_to_measure(vectors.factory, vectors.exact, self.dba):
            self.recall = None
        elif self.built or changed or params_changed or self.recall is None:
            self.measure_recall(vectors)
        elif self.record.get("search_params"):
            apply_search_params(vectors.index, SearchParams.from_json(self.record["search_params"]))
        self.record = self.describe(vectors)
        return vectors

    def measure_recall(self, vectors: VectorIndex) -> None:
        """Recall against exact search on the held-out seeded sample; with no search settings asked for, tries the
        ladder (nprobe or efSearch) and keeps the smallest that reaches RECALL_TARGET 1-recall@10."""
        started = time.perf_counter()
        ids = self.catalog.ids()
        query_ids, _ = seeded_samples(ids, self.recall_queries, 0, self.config.seed)
        self.status(f"measuring the FAISS index's recall on {len(query_ids):,} queries against exact search")
        query_ids, queries = sample_vectors(self.catalog.vectors(query_ids))
        # against exact search in the space the index searches: after its whitening, where it has one
        transform = whitening_of(vectors.index) or (lambda x: x)
        stored = self.augmented if self.augmented is not None else ((i, transform(v)) for i, v in self.catalog.vectors())
        exact = exact_neighbours(stored, transform(queries), query_ids, K)
        asked = self.requested_params.used_by(vectors.index)
        ladder = [asked] if asked.to_json() else (tuning_ladder(vectors.index) or [SearchParams()])
        results, chosen = [], None
        for params in ladder:
            result = measure(vectors, queries, query_ids, exact, params)
            results.append(result.to_json())
            log.info("recall with %s: 1-recall@1 %.3f, 1-recall@10 %.3f, 10-recall@10 %.3f", params.to_json() or "defaults",
                     result.recall_1_at_1, result.recall_1_at_10, result.recall_10_at_10)
            if result.recall_1_at_10 >= RECALL_TARGET:
                chosen = params
                break
        if chosen is None:
            chosen = ladder[-1]
            if not asked.to_json():
                log.warning("%s reaches 1-recall@10 %.3f at most (target %.2f)", vectors.factory,
                            results[-1]["1-recall@10"], RECALL_TARGET)
        apply_search_params(vectors.index, chosen)
        self.recall = {"queries": int(len(query_ids)), "k": K, "count": len(vectors), "measured_at": _now(),
                       "held_out": not self.train.get("trained_on_recall_queries", False),
                       "seconds": round(time.perf_counter() - started, 3), "target_1_recall_at_10": RECALL_TARGET,
                       "results": results}

    def describe(self, vectors: VectorIndex) -> dict:
        """What is recorded in the catalog with the FAISS file (and shown in --json, /stats and the gallery)."""
        whitened, inner = split_whitening(vectors.factory)
        waits = None   # auto past flat_max with too few vectors to train its type yet (a PQ code book needs 256)
        if self.requested == AUTO and inner.lower() == "flat" and len(vectors) > self.flat_max:
            wanted = auto_factory(len(vectors), whitened or self.dim, self.flat_max)
            waits = {"factory": wanted, "images": min_train_vectors(wanted)}
        return {"requested": self.requested, "factory": vectors.factory, "exact": vectors.exact,
                "auto_waits_for": waits,
                "whiten": self.whitening.to_json(), "dba": self.dba, "whitened_dim": split_whitening(vectors.factory)[0],
                "whiten_waits_for": (min_whiten_vectors(self.whitening.dim) if self.whitening.on
                                     and split_whitening(vectors.factory)[0] is None else None),
                "flat_max": self.flat_max, "recall_queries": self.recall_queries, "count": len(vectors),
                "train": self.train if not vectors.exact else None,
                "requested_search_params": self.requested_params.to_json(),
                "search_params": search_params_of(vectors.index).to_json(), "recall": self.recall,
                "file_bytes": self.path.stat().st_size if self.path.exists() else None,
                **({"regions": {"per_image": self.region_count, "count": len(self.regions),
                                **regions_file_state(self.regions_path)}} if self.regions is not None else {})}

    def save(self, vectors: VectorIndex) -> None:
        """Write the FAISS file atomically, then record in the catalog what it holds and which catalog state."""
        state = self.catalog.updated_at()   # read first: a crash between the writes only costs a reconcile
        if self.regions is not None:        # first: a reader that sees the new main file finds regions as new
            self.regions.save(self.regions_path)
        vectors.save(self.path)
        # which build the file holds, for a replica sharing the catalog: the writer may retrain after this folder's
        # file was saved (its whitening then learned on another sample), which id reconciliation cannot see
        atomic_write(build_file(self.path), build_identity(self.describe(vectors)).encode())
        self.catalog.save_faiss_digest(*sample_digest(self.path))   # a later no-op run notices a damaged file
        self.catalog.mark_vectors_saved(state)
        self.record = self.describe(vectors)   # with the size of the file just written
        self.catalog.save_vector_index_record(self.record)


def build_identity(record: dict | None) -> str:
    """What of a vector-index record fixes the vectors searched (the FAISS type, its training, its whitening), as
    text: equal for two FAISS files that search alike, whichever folder holds them."""
    record = record or {}
    train = {k: v for k, v in (record.get("train") or {}).items() if k not in ("at", "seconds")}   # (when, how long:
    return json.dumps([record.get("factory"), train, record.get("whitened_dim")], sort_keys=True)   # not what)


def build_file(path: Path) -> Path:
    """The note beside a FAISS file of the build it holds (build_identity): vectors.faiss.build."""
    return path.with_name(path.name + ".build")


def saved_build(path: Path) -> str | None:
    """The build the FAISS file at path was saved with, or None where no note says (a file copied alone, or saved
    before the notes were written)."""
    try:
        return build_file(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def outdated_build(path: Path, catalog: Catalog, record: dict | None) -> bool:
    """Whether the FAISS file at path, in a folder sharing a catalog on a database server, holds an earlier build than
    the catalog records (the writer retrained or changed the type elsewhere since it was saved); said in the log.
    False for an SQLite catalog (one folder), and for a file without a note (taken for the catalog's build)."""
    saved = saved_build(path) if catalog.path is None else None
    if saved is None or saved == build_identity(record):
        return False
    log.warning("the FAISS file %s holds an earlier build than the catalog records (the writer retrained or changed "
                "the type since it was saved): building the recorded one from the catalog", path)
    return True


def maintain_vectors(catalog: Catalog, path: Path, dim: int, config: IndexTypeConfig,
                     status: Callable[[str], None] | None = None) -> tuple[dict, int]:
    """A run without new images: bring the FAISS file in step with the catalog and config without the network.
    status: told what it is doing (IndexBuilder.status). -> (the recorded description, vector count)."""
    builder = IndexBuilder(catalog, path, dim, config)
    if status is not None:
        builder.status = status
    vectors, changed = builder.open()
    vectors = builder.finish(vectors, changed)
    builder.save(vectors)
    return builder.record, len(vectors)


def rebuilt_from_catalog(catalog: Catalog, path: Path, dim: int, *, reader: bool = True) -> VectorIndex | None:
    """The FAISS type the catalog records, built again from it in memory, for a reader whose file is missing or is
    another catalog's (a replica started without one, a database made anew under it): trained as index-images trains
    it (the seeded sample of the catalog's ids now), so searches rank as the writer's do, whitened where the index
    is. None for a recorded Flat, or nothing recorded: the raw vectors are the index then."""
    record = catalog.vector_index_record() or {}
    factory = record.get("factory")
    if not factory or factory == FLAT or not len(catalog.ids()):
        return None
    train = record.get("train") or {}
    builder = IndexBuilder(catalog, path, dim, IndexTypeConfig(seed=train.get("seed", 0)))
    builder.region_count = 0   # the reader opens the regional vectors itself
    if reader:
        log.warning("the FAISS file %s is missing or not this catalog's: building %s from the catalog in memory (run "
                    "index-images on the writer's folder to save one)", path, factory)
    else:   # index-images in a folder sharing the catalog: it saves what it builds
        log.info("building the recorded %s from the catalog for %s (its training reproduced)", factory, path)
    ids = catalog.ids()
    # trained among the ids the writer's file was (those since removed aside), so both whiten alike
    trained_on = ids[ids <= train["last_id"]] if train.get("last_id") else ids[:train.get("count") or len(ids)]
    return builder.build(factory, trained_on if len(trained_on) >= min_train_vectors(factory) else None)


def recall_for(record: dict | None, params: SearchParams) -> dict | None:
    """The recorded recall measurement made with these search settings, or None (not measured with them)."""
    recall = (record or {}).get("recall") or {}
    wanted = params.to_json()
    return next((r for r in recall.get("results", []) if r["search_params"] == wanted), None)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
