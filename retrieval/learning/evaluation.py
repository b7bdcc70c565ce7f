"""Evaluating indexes: the labelled vectors an index stores, loaded and scored (one index, or two on the images they share)."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retrieval.catalog import Catalog, weights_label
from retrieval.learning.metrics import EvaluationError, evaluate_vectors   # EvaluationError: the metrics' check_labels raises it too
from retrieval.names import DEFAULT_KS
from retrieval.system import display_name

log = logging.getLogger(__name__)


# --- loading ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LabelledVectors:
    ids: np.ndarray        # shape=(n,), int64, catalog ids
    vectors: np.ndarray    # shape=(n, dim), float32
    labels: list[str]      # n labels
    unlabelled: int        # images of the index without a label (left out of the evaluation)
    paths: list[str] = dataclasses.field(default_factory=list)    # n paths relative to the data folder, as stored
    sha256: list[str] = dataclasses.field(default_factory=list)   # n content hashes

    def subset(self, rows: Sequence[int]) -> "LabelledVectors":
        """These rows only, in this order (unlabelled count kept)."""
        rows = np.asarray(rows, dtype=np.int64)
        return LabelledVectors(self.ids[rows], self.vectors[rows], [self.labels[r] for r in rows], self.unlabelled,
                               [self.paths[r] for r in rows], [self.sha256[r] for r in rows])


def load_labelled_vectors(catalog: Catalog) -> LabelledVectors:
    """The stored vectors of every labelled image, in id order; no network, no forward pass."""
    ids, vecs, labels, paths, hashes, unlabelled = [], [], [], [], [], 0
    for chunk_ids, chunk_vecs in catalog.vectors():
        records = catalog.get_many(chunk_ids)
        chunk_labels = [getattr(records.get(int(i)), "label", None) for i in chunk_ids]   # None: unlabelled or just removed
        chunk_labels = [None if x is None else display_name(x) for x in chunk_labels]      # as text, for reports
        keep = [j for j, label in enumerate(chunk_labels) if label is not None]
        unlabelled += sum(1 for i in chunk_ids if int(i) in records) - len(keep)
        ids.append(chunk_ids[keep])
        vecs.append(chunk_vecs[keep])
        labels += [chunk_labels[j] for j in keep]
        paths += [records[int(chunk_ids[j])].path for j in keep]
        hashes += [records[int(chunk_ids[j])].sha256 for j in keep]
    settings = catalog.settings()
    dim = settings.dim if settings else 0
    return LabelledVectors(np.concatenate(ids) if ids else np.zeros(0, np.int64),
                           np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float32), labels, unlabelled,
                           paths, hashes)


def _load_index(index_dir: Path | str, db_url: str | None = None) -> tuple[dict, LabelledVectors]:
    """-> ({dir, model, layer, weights, weights_label, weights_identity, seed, dim, normalize, data_dir}, its labelled vectors).

    db_url: the catalog's URL (None: SQLite in index_dir). Raises FileNotFoundError for a folder without an index,
    catalog.CatalogUnavailable when its database cannot be reached."""
    catalog = Catalog(Path(index_dir), url=db_url)
    try:
        settings = catalog.settings()
        data = load_labelled_vectors(catalog)
    finally:
        catalog.close()
    if settings is None:
        raise FileNotFoundError(f"the index at {index_dir} has no settings yet; run index-images first")
    about = {"dir": str(index_dir), "model": settings.model, "layer": settings.layer, "views": settings.views,
             "weights": settings.weights,
             "weights_label": weights_label(settings), "weights_identity": settings.weights_identity,
             "seed": settings.seed, "dim": settings.dim,
             "normalize": settings.normalize, "data_dir": settings.data_dir}
    return about, data


def evaluate_index(index_dir: Path | str, ks: Sequence[int] = DEFAULT_KS, *, seed: int = 0, probe: bool = True,
                   db_url: str | None = None) -> dict:
    """evaluate_vectors on an index folder's stored vectors, plus {"index": {dir, model, layer, weights,
    weights_label (a file's name and short hash, never its path), weights_identity, seed, dim, normalize, data_dir}}.

    db_url: the catalog's URL (None: SQLite in index_dir). Raises FileNotFoundError for a folder without an
    index, catalog.CatalogUnavailable when its database cannot be reached, EvaluationError when it cannot be
    evaluated.
    """
    about, data = _load_index(index_dir, db_url)
    log.info("evaluating %d labelled vectors (%d unlabelled left out)", len(data.labels), data.unlabelled)
    result = evaluate_vectors(data.vectors, data.labels, ks, seed=seed, probe=probe, unlabelled=data.unlabelled)
    return {"index": about, **result}


MATCHED_BY = "path relative to the data folder, label and content hash (sha256)"


def match_images(a: LabelledVectors, b: LabelledVectors) -> tuple[list[int], list[int], dict[str, int]]:
    """The labelled images two indexes share: same path relative to each one's data folder, same label, same content.

    -> (rows of a, rows of b, counts), rows in path order so both sides list the same images in the same order
    (and a seeded split picks the same images on both sides); counts: {matched, only_a, only_b, differing}, where
    differing counts paths in both whose label or content differ (left out)."""
    where_b = {path: j for j, path in enumerate(b.paths)}
    rows_a, rows_b, differing = [], [], 0
    for i in sorted(range(len(a.paths)), key=lambda i: a.paths[i]):
        j = where_b.get(a.paths[i])
        if j is None:
            continue
        if a.labels[i] != b.labels[j] or a.sha256[i] != b.sha256[j]:
            differing += 1
            continue
        rows_a.append(i)
        rows_b.append(j)
    common = len(rows_a) + differing
    return rows_a, rows_b, {"matched": len(rows_a), "only_a": len(a.paths) - common, "only_b": len(b.paths) - common,
                            "differing": differing}


def compare_indexes(index_a: Path | str, index_b: Path | str, ks: Sequence[int] = DEFAULT_KS, *, seed: int = 0,
                    probe: bool = True, db_url: str | None = None) -> dict:
    """evaluate_vectors on each index, restricted to the labelled images both hold (match_images), in the same order.

    -> {"a": result, "b": result (each as evaluate_index's, with "index"), "matched": {images, only_a, only_b,
    differing, by}}. The linear probe uses the same seeded split on both. Raises FileNotFoundError (no index),
    EvaluationError (no shared labelled image, or too few to evaluate)."""
    about_a, data_a = _load_index(index_a, db_url)   # db_url: index_a's catalog; index_b's is SQLite in its folder
    about_b, data_b = _load_index(index_b)
    rows_a, rows_b, counts = match_images(data_a, data_b)
    if not rows_a:
        raise EvaluationError(
            f"the two indexes share no labelled image ({len(data_a.labels)} labelled in {index_a}, {len(data_b.labels)} "
            f"in {index_b}; {counts['differing']} path(s) in both with another label or content). Compare indexes of "
            "the same labelled folder: index it again with the other network into a second --index-dir.")
    log.info("comparing on %d shared labelled images", len(rows_a))
    results = {}
    for side, about, data, rows in (("a", about_a, data_a, rows_a), ("b", about_b, data_b, rows_b)):
        part = data.subset(rows)
        result = evaluate_vectors(part.vectors, part.labels, ks, seed=seed, probe=probe, unlabelled=data.unlabelled)
        left_out = counts["only_a" if side == "a" else "only_b"] + counts["differing"]
        if left_out:
            result["notes"].append(f"{left_out} labelled image(s) of this index left out: not in the other index "
                                   "with the same label and content")
        results[side] = {"index": about, **result}
    return {**results, "matched": {"images": counts["matched"], "only_a": counts["only_a"], "only_b": counts["only_b"],
                                   "differing": counts["differing"], "by": MATCHED_BY}}
