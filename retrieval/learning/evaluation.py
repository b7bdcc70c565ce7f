"""Evaluating indexes: the labelled vectors an index stores, loaded and scored (one index, or two on the images they share)."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retrieval.catalog import Catalog, IndexSettings, weights_label
from retrieval.features.weights import WeightsChoice
from retrieval.learning.history import TRAINING_NONE_LEARNED, TRAINING_RECORDED
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


# --- the images the network was fine-tuned on ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainingImages:
    """What an index knows of the images its network was fine-tuned on (recorded by index-images from the history)."""
    status: str                      # "none" (ImageNet or random weights), "recorded", or why they are unknown
    train_sha256: frozenset[str] = frozenset()
    val_sha256: frozenset[str] = frozenset()
    reason: str | None = None        # why they cannot be told apart (status neither "none" nor "recorded")

    @property
    def known(self) -> bool:
        return self.status in ("none", TRAINING_RECORDED)


def training_images(catalog: Catalog, settings: IndexSettings) -> TrainingImages:
    """The index's record of its network's training images (Catalog.training_record), as a TrainingImages."""
    if not settings.weights_choice.is_file:
        return TrainingImages("none")
    record = catalog.training_record()
    if record is None:
        return TrainingImages("not_recorded", reason="the index was made before index-images recorded the images its "
                              "weights were fine-tuned on; run index-images on it again to record them (it reads the "
                              "fine-tune history next to the weights file)")
    if record.get("weights_identity") != settings.weights_identity:
        return TrainingImages("other_weights", reason="the record of training images is for other weights")
    if record["status"] == TRAINING_NONE_LEARNED:   # as ImageNet or random weights: every image is held out
        return TrainingImages("none", reason=record["reason"])
    if record["status"] != TRAINING_RECORDED:
        return TrainingImages(record["status"], reason=record["reason"])
    return TrainingImages(TRAINING_RECORDED, frozenset(record["train_sha256"]), frozenset(record["val_sha256"]))


def _training_facts(training: TrainingImages, hashes: Sequence[str], include: bool) -> dict:
    """The "training_images" entry of a result: {"status": "excluded" | "included" | "unknown" | "none",
    "in_index": the evaluated set's images the network trained on (None when unknown), "reason"}."""
    if training.status == "none":
        return {"status": "none", "in_index": 0, "reason": training.reason}
    if not training.known:
        return {"status": "unknown", "in_index": None, "reason": training.reason}
    return {"status": "included" if include else "excluded",
            "in_index": sum(1 for h in hashes if h in training.train_sha256), "reason": None}


def _held_out_notes(facts: dict, evaluated: int, excluded: int, validation: int) -> list[str]:
    """What the result says of the training images, in words."""
    status = facts["status"]
    if status == "excluded" and excluded:
        notes = [f"{excluded} labelled image(s) the network was fine-tuned on left out of the queries: the "
                 f"{evaluated} held-out images query the whole index (training images included, as a search does) "
                 "and the linear probe trains on the training images"]
    elif status == "included":
        notes = [f"training images included (as asked): {facts['in_index']} of the {evaluated} evaluated images "
                 "are ones the network was fine-tuned on, which flatters it"]
    elif status == "unknown":
        notes = [f"the images the network was fine-tuned on cannot be told apart ({facts['reason']}): all "
                 f"{evaluated} labelled images are evaluated, training images possibly among them"]
    elif status == "none" and facts["reason"]:
        notes = [f"{facts['reason']}: all {evaluated} labelled images are held out"]
    else:
        notes = []
    if validation:
        notes.append(f"{validation} of the evaluated images were fine-tune's validation images, which chose the "
                     "epoch kept: new images are the fairest test")
    return notes


# --- one index, two indexes -----------------------------------------------------------------------------

def _load_index(index_dir: Path | str, db_url: str | None = None) -> tuple[dict, LabelledVectors, TrainingImages]:
    """-> ({dir, model, layer, weights, weights_label, weights_identity, seed, dim, normalize, data_dir}, its labelled
    vectors, its network's training images).

    db_url: the catalog's URL (None: SQLite in index_dir). Raises FileNotFoundError for a folder without an index,
    catalog.CatalogUnavailable when its database cannot be reached."""
    catalog = Catalog(Path(index_dir), url=db_url)
    try:
        settings = catalog.settings()
        data = load_labelled_vectors(catalog)
        if settings is None:
            raise FileNotFoundError(f"the index at {index_dir} has no settings yet; run index-images first")
        training = training_images(catalog, settings)
        vectors, space = _as_searched(catalog, Path(index_dir), settings.dim, data.vectors)
    finally:
        catalog.close()
    about = {"dir": str(index_dir), "model": settings.model, "layer": settings.layer, "views": settings.views,
             "input_norm": settings.input_norm, "regions": settings.regions, "weights": settings.weights,
             "weights_label": weights_label(settings), "weights_identity": settings.weights_identity,
             "seed": settings.seed, "dim": settings.dim,
             "normalize": settings.normalize, "data_dir": settings.data_dir, **space}
    return about, dataclasses.replace(data, vectors=vectors), training


def _as_searched(catalog: Catalog, index_dir: Path, dim: int, vectors: np.ndarray) -> tuple[np.ndarray, dict]:
    """The stored vectors as the index searches them: whitened (PCAW, learned on the collection) where its FAISS index
    whitens, so that the numbers are those of the searches a user makes (on a whitened index the raw fc7 scored
    precision@10 0.908 where its searches gave 0.925). -> (vectors shape=(n, d), {"whitened_dim": d or None,
    "vector_index": the FAISS type}). Only a whitened index's FAISS file is read (mapped), or, where it is missing or
    unreadable, its type built from the catalog in memory as a replica's reader builds it."""
    from retrieval.names import FAISS_FILE
    from retrieval.vectors.builder import rebuilt_from_catalog
    from retrieval.vectors.vector_index import VectorIndex
    from retrieval.vectors.whitening import split_whitening, whitening_of

    record = catalog.vector_index_record() or {}
    factory = record.get("factory")
    space = {"whitened_dim": None, "vector_index": factory}
    if not factory or split_whitening(factory)[0] is None or not len(vectors):
        return vectors, space
    path = index_dir / FAISS_FILE
    index = VectorIndex.load(path, dim, factory=factory, mmap=True) or rebuilt_from_catalog(catalog, path, dim)
    whitening = whitening_of(index.index) if index is not None else None
    if whitening is None:
        return vectors, space
    return whitening(vectors), {**space, "whitened_dim": split_whitening(factory)[0]}   # (index alive meanwhile)


def evaluate_index(index_dir: Path | str, ks: Sequence[int] = DEFAULT_KS, *, seed: int = 0, probe: bool = True,
                   db_url: str | None = None, include_training_images: bool = False) -> dict:
    """evaluate_vectors on an index folder's stored vectors, on the images its network was not fine-tuned on.

    The images the index records as its network's training images (by content hash) are left out of the queries
    unless include_training_images; they stay in the searched collection. -> evaluate_vectors' result plus
    {"index": {dir, model, layer, weights, weights_label (a file's name and short hash, never its path),
    weights_identity, seed, dim, normalize, data_dir}, "evaluated_images": n, "excluded_training_images": n,
    "training_images": {status ("excluded", "included", "unknown": not recorded, "none": not fine-tuned), in_index,
    reason}}.

    db_url: the catalog's URL (None: SQLite in index_dir). Raises FileNotFoundError for a folder without an
    index, catalog.CatalogUnavailable when its database cannot be reached, EvaluationError when it cannot be
    evaluated (no held-out image left among them).
    """
    about, data, training = _load_index(index_dir, db_url)
    facts = _training_facts(training, data.sha256, include_training_images)
    trained = np.array([h in training.train_sha256 for h in data.sha256], dtype=bool)
    exclude = trained if facts["status"] == "excluded" else np.zeros(len(trained), dtype=bool)
    if exclude.any() and exclude.all():
        raise EvaluationError(
            f"all {len(exclude)} labelled images of the index are ones its network was fine-tuned on, so none is "
            "left to evaluate on; index new images of the same classes with it, or pass --include-training-images "
            "(flattering)")
    log.info("evaluating %d labelled vectors (%d unlabelled, %d training images left out)", int((~exclude).sum()),
             data.unlabelled, int(exclude.sum()))
    result = evaluate_vectors(data.vectors, data.labels, ks, seed=seed, probe=probe, unlabelled=data.unlabelled,
                              queries=None if not exclude.any() else ~exclude)
    validation = sum(1 for h, x in zip(data.sha256, exclude) if not x and h in training.val_sha256)
    result["notes"] = _held_out_notes(facts, result["evaluated_images"], int(exclude.sum()), validation) + result["notes"]
    return {"index": about, **result, "excluded_training_images": int(exclude.sum()), "training_images": facts}


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
                    probe: bool = True, db_url: str | None = None, include_training_images: bool = False) -> dict:
    """evaluate_vectors on each index, restricted to the labelled images both hold (match_images), in the same order,
    with the same queries: the images neither network was fine-tuned on (the union of both indexes' training images
    is left out of the queries, unless include_training_images).

    -> {"a": result, "b": result (each as evaluate_index's, with "index", "evaluated_images",
    "excluded_training_images" and its own "training_images"), "matched": {images, only_a, only_b, differing, by,
    evaluated_images, excluded_training_images}}. The linear probe uses the same split on both. Raises
    FileNotFoundError (no index), EvaluationError (no shared labelled image, or too few to evaluate)."""
    about_a, data_a, training_a = _load_index(index_a, db_url)   # db_url: index_a's catalog; index_b's is SQLite in its folder
    about_b, data_b, training_b = _load_index(index_b)
    rows_a, rows_b, counts = match_images(data_a, data_b)
    if not rows_a:
        raise EvaluationError(
            f"the two indexes share no labelled image ({len(data_a.labels)} labelled in {index_a}, {len(data_b.labels)} "
            f"in {index_b}; {counts['differing']} path(s) in both with another label or content). Compare indexes of "
            "the same labelled folder: index it again with the other network into a second --index-dir.")
    parts = {"a": data_a.subset(rows_a), "b": data_b.subset(rows_b)}
    hashes = parts["a"].sha256                                   # the same content on both sides
    facts = {"a": _training_facts(training_a, hashes, include_training_images),
             "b": _training_facts(training_b, hashes, include_training_images)}
    excluded_hashes = set()
    for side, training in (("a", training_a), ("b", training_b)):
        if facts[side]["status"] == "excluded":
            excluded_hashes |= training.train_sha256
    exclude = np.array([h in excluded_hashes for h in hashes], dtype=bool)
    if exclude.all():
        raise EvaluationError(
            f"all {len(exclude)} labelled images the two indexes share are ones a network was fine-tuned on, so none "
            "is left to evaluate on; index new images of the same classes with both, or pass "
            "--include-training-images (flattering)")
    validation_hashes = training_a.val_sha256 | training_b.val_sha256
    validation = sum(1 for h, x in zip(hashes, exclude) if not x and h in validation_hashes)
    log.info("comparing on %d shared labelled images (%d training images left out)", len(rows_a), int(exclude.sum()))
    results = {}
    for side, about, data in (("a", about_a, data_a), ("b", about_b, data_b)):
        part = parts[side]
        result = evaluate_vectors(part.vectors, part.labels, ks, seed=seed, probe=probe, unlabelled=data.unlabelled,
                                  queries=None if not exclude.any() else ~exclude)
        notes = _held_out_notes(facts[side], result["evaluated_images"], 0, 0)
        if facts[side]["status"] == "excluded" and facts[side]["in_index"]:
            notes.append(f"this network was fine-tuned on {facts[side]['in_index']} of the shared images "
                         "(left out of both sides' queries)")
        left_out = counts["only_a" if side == "a" else "only_b"] + counts["differing"]
        if left_out:
            notes.append(f"{left_out} labelled image(s) of this index left out: not in the other index "
                         "with the same label and content")
        result["notes"] = notes + result["notes"]
        results[side] = {"index": about, **result, "excluded_training_images": int(exclude.sum()),
                         "training_images": facts[side]}
    shared = []
    if exclude.any():
        shared.append(f"{int(exclude.sum())} shared image(s) a network was fine-tuned on left out of the queries: "
                      f"both are scored on the same {results['a']['evaluated_images']} held-out images, which query "
                      "all the shared images")
    if validation:
        shared.append(f"{validation} of the evaluated images were fine-tune's validation images, which chose the "
                      "epoch kept: new images are the fairest test")
    if WeightsChoice.parse(about_a["weights"]).is_file and not WeightsChoice.parse(about_b["weights"]).is_file:
        shared.append("A holds the fine-tuned weights and B does not, so B - A is the fine-tune's gain with its sign "
                      "turned: to read it as a gain, put the fine-tuned index second (evaluate-index --index-dir B "
                      "--compare A; retrieval.compare(B, A))")
    return {**results, "matched": {"images": counts["matched"], "only_a": counts["only_a"], "only_b": counts["only_b"],
                                   "differing": counts["differing"], "by": MATCHED_BY,
                                   "evaluated_images": results["a"]["evaluated_images"],
                                   "excluded_training_images": int(exclude.sum()), "notes": shared}}
