"""Near-duplicates in an opened index: the grouping threshold calibrated on the collection's own edited copies, the
groups with a suggested keeper each, and the label-free copy measure (recall of edited copies, duplicate F1)."""
from __future__ import annotations

import dataclasses
import functools
import logging
import random

import numpy as np
import torch

from retrieval.catalog.catalog import ImageRecord
from retrieval.images.decode import DECODE_ERRORS, ImageDecodeError, open_rgb
from retrieval.images.edits import EDITS, edited_copies
from retrieval.search.duplicate_groups import DuplicateGroups, DuplicateImage, Threshold, file_identities, keeper_order
from retrieval.search.index import ImageIndex
from retrieval.search.snapshot import IndexSnapshot
from retrieval.system import progress_bar
from retrieval.vectors.duplicates import (DEFAULT_GROUPING, DEFAULT_WHITEN_DIM, GROUPING_BETA, GROUPINGS, MIN_WHITENED,
                                          WHITEN_TRAIN_MAX, choose_threshold, close_pairs, nearest_distance_rows,
                                          pair_scores)
from retrieval.vectors.whitening import learn_whitening, whiten

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 24     # images of the collection whose edited copies calibrate the threshold
CALIBRATION_SEED = 0        # which images and edits: the same collection gets the same threshold
NEIGHBOURS = 32             # nearest-neighbour distances taken per image for the calibration
NEIGHBOUR_IMAGES = 2000     # images whose nearest neighbours are taken (a seeded sample of a larger collection)
BATCH = 32                  # copies embedded per forward pass


class DuplicatesError(ValueError):
    """The collection cannot be grouped or measured as asked (too few images, none readable); the message says why."""


@dataclasses.dataclass(frozen=True)
class CollectionVectors:
    """The catalog's vectors whitened with the whitening learned on them (the raw ones are not kept)."""
    ids: np.ndarray          # shape=(n,) int64, ascending
    white: np.ndarray        # shape=(n, d_out) float32, whitened and L2-normalised
    whitening: object        # the faiss.PCAMatrix (see retrieval.vectors.duplicates.learn_whitening); None below MIN_WHITENED

    @functools.cached_property
    def rows(self) -> dict[int, int]:
        """image id -> its row in white."""
        return {int(i): r for r, i in enumerate(self.ids)}


def collection_vectors(snapshot: IndexSnapshot, dim: int = DEFAULT_WHITEN_DIM, progress: bool = False,
                       ) -> CollectionVectors:
    """Every catalog vector, whitened with the whitening learned on them (on a random WHITEN_TRAIN_MAX when there
    are more), read in chunks: the raw 4096-d vectors are never all in memory. progress: a bar per pass over the
    catalog on a terminal. Raises DuplicatesError below two images."""
    count = snapshot.catalog.count()
    if count < 2:
        raise DuplicatesError("the index holds fewer than two images: nothing can be a duplicate")
    rng = np.random.default_rng(0)
    share = min(1.0, WHITEN_TRAIN_MAX / count)
    sample, ids, chunks = [], [], []
    with progress_bar(progress, "reading vectors", count) as bar:
        for chunk_ids, chunk in snapshot.catalog.vectors():
            sample.append(chunk if share == 1.0 else chunk[rng.random(len(chunk)) < share])
            if share == 1.0:
                ids.append(chunk_ids)
            bar.update(len(chunk_ids))
    train = np.concatenate(sample)
    if len(train) < 2:
        raise DuplicatesError("the index holds fewer than two readable vectors: nothing can be a duplicate")
    # a few images cannot estimate a whitening: with n // 4 components, 3 or 5 photos came out one-dimensional,
    # every pair at distance 0 or 2, and all were grouped; their own unit vectors keep them apart
    pca = learn_whitening(train, dim) if len(train) >= MIN_WHITENED else None
    if share == 1.0:   # all of them are in memory already
        return CollectionVectors(np.concatenate(ids), whiten(pca, train), pca)
    del train, sample
    with progress_bar(progress, "whitening vectors", count) as bar:
        for chunk_ids, chunk in snapshot.catalog.vectors():   # a second pass, whitening chunk by chunk
            ids.append(chunk_ids)
            chunks.append(whiten(pca, chunk))
            bar.update(len(chunk_ids))
    return CollectionVectors(np.concatenate(ids), np.concatenate(chunks), pca)


def edited_copy_vectors(snapshot: IndexSnapshot, records: list[ImageRecord], seed: int, progress: bool = False,
                        ) -> tuple[list[ImageRecord], np.ndarray, list[str]]:
    """The edited copies (every edit of retrieval.images.edits) of the images at records, through the index's own
    network -> (the records whose file could be read, vectors shape=(len * edits, dim) float32 in record order,
    the edit names in their order within each record). Files that cannot be read are left out (logged).
    progress: a bar over the copies' forward passes on a terminal."""
    assert snapshot.extractor is not None, "the index was opened without its network"
    prep = snapshot.extractor.preprocessing
    used, crops = [], []
    for rec in records:
        try:
            img = open_rgb(snapshot.data_dir / rec.path, min_side=3 * prep.resize_size)
        except (ImageDecodeError, *DECODE_ERRORS) as exc:
            log.warning("cannot read %s for its edited copies: %s", rec.path, exc)
            continue
        used.append(rec)
        crops.extend(prep.crop(c) for c in edited_copies(img, seed).values())   # each (3, crop, crop) uint8
    if not crops:
        return used, np.zeros((0, snapshot.settings.dim), np.float32), list(EDITS)
    out = []
    with progress_bar(progress, "edited copies", len(crops), unit="copy") as bar:
        for s in range(0, len(crops), BATCH):
            out.append(snapshot.embed(torch.from_numpy(np.stack(crops[s:s + BATCH]))))
            bar.update(len(out[-1]))
    return used, np.concatenate(out), list(EDITS)


def _sample_records(snapshot: IndexSnapshot, ids: np.ndarray, n: int, seed: int,
                    avoid: set[int] = frozenset()) -> list[ImageRecord]:
    pool = [int(i) for i in ids if int(i) not in avoid] or [int(i) for i in ids]
    chosen = random.Random(seed).sample(pool, min(n, len(pool)))
    records = snapshot.catalog.get_many(chosen)
    return [records[i] for i in chosen if i in records]


def calibration_distances(snapshot: IndexSnapshot, vectors: CollectionVectors, same_file: dict[str, list[int]],
                          images: int = CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED, progress: bool = False,
                          ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """What the threshold is chosen from: edited copies of `images` sampled images give copy distances (each copy to
    its image) and sibling distances (two copies of one image to each other); up to NEIGHBOUR_IMAGES images of the
    collection (all of a smaller one; a seeded sample) give neighbour distances, each to its NEIGHBOURS nearest
    other images (byte copies left out) -> (images copied, copy distances shape=(used * edits,), neighbour distances
    shape=(sampled, NEIGHBOURS) with inf where fewer, sibling distances shape=(used * edits * (edits - 1) / 2,)).
    same_file: see same_file_rows. Raises DuplicatesError."""
    records = _sample_records(snapshot, vectors.ids, images, seed)
    used, copies, edits = edited_copy_vectors(snapshot, records, seed, progress)
    if not used:
        raise DuplicatesError(f"none of the {len(records)} sampled images could be read from {snapshot.data_dir} "
                              "to calibrate the threshold; give one with --threshold")
    rows = vectors.rows
    white = whiten(vectors.whitening, copies).reshape(len(used), len(edits), -1)   # (images, edits, d_out)
    originals = vectors.white[[rows[r.id] for r in used]]                          # (images, d_out)
    copy_d = np.linalg.norm(white - originals[:, None, :], axis=2).ravel()
    a, b = np.triu_indices(len(edits), 1)
    sibling_d = np.linalg.norm(white[:, a] - white[:, b], axis=2).ravel()
    n = len(vectors.ids)
    sample = np.arange(n) if n <= NEIGHBOUR_IMAGES else \
        np.sort(np.random.default_rng(seed).choice(n, NEIGHBOUR_IMAGES, replace=False))
    neighbour_d = nearest_distance_rows(vectors.white, sample, NEIGHBOURS,
                                        [g for g in same_file.values() if len(g) > 1])
    return len(used), copy_d, neighbour_d, sibling_d


def calibrate(snapshot: IndexSnapshot, vectors: CollectionVectors, same_file: dict[str, list[int]],
              images: int = CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED,
              grouping: str = DEFAULT_GROUPING, progress: bool = False) -> Threshold:
    """Choose the threshold on the collection itself (choose_threshold on calibration_distances). Raises
    DuplicatesError."""
    used, copy_d, neighbour_d, sibling_d = calibration_distances(snapshot, vectors, same_file, images, seed,
                                                                 progress)
    choice = choose_threshold(copy_d, neighbour_d, GROUPING_BETA[grouping], sibling_d)
    log.info("calibrated threshold %.4f on %d copies, %d neighbour distances", choice.threshold, choice.copies,
             choice.neighbours)
    return Threshold(choice.threshold, "calibrated", choice, used)


def same_file_rows(records: dict[int, ImageRecord], vectors: CollectionVectors) -> dict[str, list[int]]:
    """sha256 -> the rows (in vectors) of the images with that content."""
    out: dict[str, list[int]] = {}
    for rec in records.values():
        if rec.id in vectors.rows:
            out.setdefault(rec.sha256, []).append(vectors.rows[rec.id])
    return out


def _records(snapshot: IndexSnapshot, ids: np.ndarray) -> dict[int, ImageRecord]:
    ids = [int(i) for i in ids]
    out: dict[int, ImageRecord] = {}
    for s in range(0, len(ids), 5000):
        out.update(snapshot.catalog.get_many(ids[s:s + 5000]))
    return out


def group_rows(white: np.ndarray, threshold: float, same_file: list[list[int]],
               grouping: str = DEFAULT_GROUPING) -> list[list[int]]:
    """Rows of white (whitened vectors) grouped by the rule GROUPINGS[grouping] at threshold ("complete": every two
    rows of a group closer than it; "connected": rows closer than it, joined through each other), and rows holding
    the same file (lists of rows) always in one group -> groups of rows.

    Each same-file list is grouped as its first row (the others' pairs move to it), then comes back whole."""
    pairs, _ = close_pairs(white, threshold)
    first = np.arange(len(white))
    for g in same_file:
        first[g] = g[0]
    pairs = np.unique(np.sort(first[pairs], axis=1), axis=0) if len(pairs) else pairs
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]                             # pairs within one file's rows go
    grouped = GROUPINGS[grouping](white, pairs, threshold)
    rest = {g[0]: g for g in same_file}
    groups = [sorted(r for row in g for r in rest.pop(row, [row])) for g in grouped]
    return groups + [sorted(g) for g in rest.values()]


def check_threshold(threshold: float) -> float:
    """threshold, a distance between whitened (unit) vectors, if 0 < threshold < 2 (at 2 every image is one group).
    Raises DuplicatesError, NaN included."""
    if not 0 < threshold < 2:
        raise DuplicatesError(f"the threshold is a distance between whitened vectors, above 0 and below 2, not "
                              f"{threshold}")
    return threshold


def find_duplicates(index: ImageIndex, *, threshold: float | None = None, dim: int = DEFAULT_WHITEN_DIM,
                    calibration_images: int = CALIBRATION_IMAGES, grouping: str = DEFAULT_GROUPING,
                    progress: bool = False) -> DuplicateGroups:
    """Groups of near-duplicate images of an index: images whose whitened catalog vectors are all closer than the
    threshold to one another (calibrated on the collection when not given; grouping "connected": joined pair by pair
    instead), and byte-identical files (same sha256) always. Each group starts with its suggested keeper
    (keeper_order); groups come largest first. Nothing is changed. progress: bars on a terminal (stderr) while the
    vectors are read and the calibration's copies go through the network. Raises DuplicatesError."""
    if threshold is not None:
        check_threshold(threshold)
    snapshot = index.snapshot()
    vectors = collection_vectors(snapshot, dim, progress)
    records = _records(snapshot, vectors.ids)
    by_content = same_file_rows(records, vectors)
    chosen = calibrate(snapshot, vectors, by_content, calibration_images, grouping=grouping, progress=progress) \
        if threshold is None else Threshold(float(threshold), "given", None)
    same_file = [g for g in by_content.values() if len(g) > 1]
    groups = []
    for rows in group_rows(vectors.white, chosen.value, same_file, grouping):
        members = [records[int(vectors.ids[r])] for r in rows]
        identity = file_identities(snapshot.data_dir, members)
        members.sort(key=lambda m: (identity.get(m.path, (False, None))[0], keeper_order(m)))   # a symlink never kept
        named: dict[tuple[int, int], str] = {}   # a file -> the first member naming it
        links = {}
        for m in members:
            file = identity.get(m.path, (False, None))[1]
            if file in named:
                links[m.path] = named[file]
            elif file is not None:
                named[file] = m.path
        keep = vectors.white[vectors.rows[members[0].id]]
        group = [DuplicateImage(m.id, m.path, m.label, m.width, m.height, m.size, m.mtime_ns, m.sha256,
                                0.0 if m.sha256 == members[0].sha256
                                else float(np.linalg.norm(vectors.white[vectors.rows[m.id]] - keep)),
                                links.get(m.path))
                 for m in members]
        # the keeper, then nearest first, another name of a file right after the file
        groups.append(group[:1] + sorted(group[1:], key=lambda d: (d.distance, d.link_to or d.path, d.link_to is not None)))
    # groups holding a byte-identical copy or another name of a file first (certain: a review found the real copies
    # at groups 6 and 10 of 107 alike-looking ones), then the largest
    groups.sort(key=lambda g: (len({d.sha256 for d in g}) == len(g) and not any(d.link_to for d in g), -len(g),
                               g[0].path))
    return DuplicateGroups(groups, chosen, len(vectors.ids), whitened=vectors.whitening is not None,
                           random_weights=snapshot.settings.weights_choice.is_random, data_dir=snapshot.data_dir)


def evaluate_copies(index: ImageIndex, copies: int, *, seed: int = 1, threshold: float | None = None,
                    dim: int = DEFAULT_WHITEN_DIM, progress: bool = False) -> dict:
    """The label-free measure: edited copies (every edit) of `copies` images of the collection, made now and put
    through the index's network, are searched in the index (as search-images does) and grouped with the collection
    (as find-duplicates does, at its default threshold unless given).

    -> {"images", "asked", "calibration_images" (left for the threshold), "also_calibrated" (measured images that
        calibrated the threshold too: a collection of too few images to keep them apart), "copies", "edits", "recall_at_1", "recall_at_5", "per_edit": {edit: recall@1},
        "duplicates": {"threshold", "precision", "recall", "f1", ...}}. recall@k: share of the copies whose original
    (or a byte copy of it) is among their k nearest. within_threshold: share of the copies closer than the threshold
    to their original (what find-duplicates reports for its calibration copies). Duplicate pairs counted: those with a
    copy in them (true when the copy and the other image come from the same original; copies of one original among
    themselves too), in the groups (every two images of a group within the threshold). Raises DuplicatesError."""
    snapshot = index.snapshot()
    vectors = collection_vectors(snapshot, dim, progress)
    all_records = _records(snapshot, vectors.ids)
    by_content = same_file_rows(all_records, vectors)
    chosen = calibrate(snapshot, vectors, by_content, progress=progress) if threshold is None \
        else Threshold(float(threshold), "given", None)
    avoid: set[int] = set()
    if chosen.source == "calibrated":   # measure on other images than the calibration's, where there are enough
        avoid = {r.id for r in _sample_records(snapshot, vectors.ids, CALIBRATION_IMAGES, CALIBRATION_SEED)}
    records = _sample_records(snapshot, vectors.ids, copies, seed, avoid)
    used, raw, edits = edited_copy_vectors(snapshot, records, seed, progress)
    if not used:
        raise DuplicatesError(f"none of the {len(records)} sampled images could be read from {snapshot.data_dir}")
    hits = snapshot.search_vectors(raw, 5)
    found1, found5 = [], []
    per_edit: dict[str, list[bool]] = {e: [] for e in edits}
    for n, hit in enumerate(hits):
        original = used[n // len(edits)]
        match = [all_records[h.id].sha256 == original.sha256 if h.id in all_records else False for h in hit]
        found1.append(bool(match[:1] and match[0]))
        found5.append(any(match[:5]))
        per_edit[edits[n % len(edits)]].append(found1[-1])
    # duplicates: the collection plus the copies, grouped at the threshold
    white = np.concatenate([vectors.white, whiten(vectors.whitening, raw)])
    n_coll = len(vectors.ids)
    same_file = [g for g in by_content.values() if len(g) > 1]
    predicted = group_rows(white, chosen.value, same_file)
    rows = vectors.rows
    truth = []
    for i, rec in enumerate(used):
        originals = next((g for g in same_file if rows[rec.id] in g), [rows[rec.id]])
        truth.append([*originals, *range(n_coll + i * len(edits), n_coll + (i + 1) * len(edits))])
    scores = pair_scores(predicted, truth, among=set(range(n_coll, len(white))))
    own = vectors.white[[rows[r.id] for r in used]].repeat(len(edits), axis=0)    # (copies, d_out) their originals
    within = float(np.mean(np.linalg.norm(white[n_coll:] - own, axis=1) < chosen.value))
    return {"images": len(used), "asked": copies, "calibration_images": len(avoid),
            "also_calibrated": sum(r.id in avoid for r in used),   # too few images to keep the two apart
            "copies": len(raw),
            "edits": edits, "seed": seed,
            "recall_at_1": float(np.mean(found1)), "recall_at_5": float(np.mean(found5)),
            "per_edit": {e: float(np.mean(v)) for e, v in per_edit.items()},
            "chance_at_1": 1 / max(1, n_coll), "chance_at_5": min(1.0, 5 / max(1, n_coll)),
            "duplicates": {"threshold": chosen.to_json(), "within_threshold": round(within, 6),
                           **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in scores.items()}}}
