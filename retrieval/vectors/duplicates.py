"""Near-duplicate groups from feature vectors, as pure functions of arrays (the whitening they are compared in is
retrieval.vectors.whitening's learn_whitening): pairs within a distance threshold (FAISS range search or k-NN), groups (connected pairs), the threshold chosen from
copy and non-copy distances, and pair precision/recall/F1 against known groups."""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import faiss
import numpy as np

DEFAULT_WHITEN_DIM = 32     # dimensions kept by the grouping's whitening (16-192 measured; see docs/duplicates.md)
THRESHOLD_BETA = 0.5        # the calibration's F-beta: precision weighs double (chosen on one benchmark set)
WHITEN_TRAIN_MAX = 50_000   # vectors the whitening is learned on (a random sample above that)
EXACT_MAX = 50_000          # up to this many vectors the pairs come from an exact range search; above, IVF k-NN
APPROX_K = 16               # neighbours looked at per vector by the approximate (k-NN) search


def close_pairs(vectors: np.ndarray, threshold: float, *, exact_max: int = EXACT_MAX,
                k: int = APPROX_K) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) of rows of vectors shape=(n, d) float32 at L2 distance below threshold
    -> (pairs shape=(p, 2) int64, distances shape=(p,) float32).

    Up to exact_max rows: an exact FAISS range search (all pairs). Above: an IVF index and each row's k nearest
    (a pair both ends miss is missed; groups still join through their other members)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    if n < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    radius = float(threshold) ** 2   # FAISS L2 indexes work in squared distances
    if n <= exact_max:
        index = faiss.IndexFlatL2(d)
        index.add(x)
        lims, dist, nbr = index.range_search(x, radius)
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(lims).astype(np.int64))     # (p,) the query row of each result
        nbr = nbr.astype(np.int64)
    else:
        nlist = int(min(65536, max(64, 4 * np.sqrt(n))))
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist)
        rng = np.random.default_rng(0)
        index.train(x[rng.choice(n, size=min(n, 40 * nlist), replace=False)])   # FAISS wants 39+ per list
        index.add(x)
        index.nprobe = 16
        dist, nbr = index.search(x, min(k + 1, n))                        # (n, k+1): itself among them
        rows = np.repeat(np.arange(n, dtype=np.int64), dist.shape[1])
        dist, nbr = dist.ravel(), nbr.ravel().astype(np.int64)
        keep = (nbr >= 0) & (dist < radius)
        rows, dist, nbr = rows[keep], dist[keep], nbr[keep]
    keep = rows < nbr                                                     # each pair once, no self pairs
    pairs = np.stack([rows[keep], nbr[keep]], axis=1)
    dists = np.sqrt(np.maximum(dist[keep], 0)).astype(np.float32)
    if len(pairs):   # the k-NN search may find a pair from both ends
        pairs, first = np.unique(pairs, axis=0, return_index=True)
        dists = dists[first]
    return pairs, dists


def connected_groups(n: int, pairs: Iterable[Sequence[int]]) -> list[list[int]]:
    """Rows 0..n-1 joined by pairs -> the groups of two or more rows (each sorted; groups by their first row)."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


@dataclasses.dataclass(frozen=True)
class ThresholdChoice:
    """A distance threshold chosen from the distances of known copies and of non-copy neighbours."""
    threshold: float
    copies: int              # copy distances it was chosen from
    neighbours: int          # non-copy neighbour distances it was chosen from
    copy_recall: float       # share of the copy distances below the threshold
    neighbour_share: float   # share of the neighbour distances below it (non-copies that would be joined)

    def to_json(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


def choose_threshold(copy_distances: np.ndarray, neighbour_distances: np.ndarray,
                     beta: float = THRESHOLD_BETA) -> ThresholdChoice:
    """The threshold that best separates copy distances (an image to its edited copy) from non-copy neighbour
    distances (an image to its nearest other images): the cut maximising F-beta with the copies as positives.
    beta < 1 weighs precision above recall: groups join through every pair, so one false pair merges two groups.

    copy_distances shape=(p,), neighbour_distances shape=(q,): L2 distances between whitened vectors."""
    pos = np.sort(np.asarray(copy_distances, dtype=np.float64))
    neg = np.sort(np.asarray(neighbour_distances, dtype=np.float64))
    assert len(pos) > 0, "no copy distances to calibrate on"
    cuts = np.unique(np.concatenate([pos, neg]))
    cuts = (cuts[:-1] + cuts[1:]) / 2 if len(cuts) > 1 else cuts + 1e-6   # between observed distances
    tp = np.searchsorted(pos, cuts, side="right")
    fp = np.searchsorted(neg, cuts, side="right")
    precision, recall = tp / np.maximum(tp + fp, 1), tp / len(pos)
    score = (1 + beta ** 2) * precision * recall / np.maximum(beta ** 2 * precision + recall, 1e-12)
    best = int(np.argmax(score))
    t = float(cuts[best])
    return ThresholdChoice(t, len(pos), len(neg), float(tp[best] / len(pos)),
                           float(fp[best] / len(neg)) if len(neg) else 0.0)


def pair_scores(predicted: Iterable[Iterable[int]], truth: Iterable[Iterable[int]],
                among: set[int] | None = None) -> dict[str, float]:
    """Pair precision, recall and F1 of predicted groups against true groups (both lists of id groups): a pair is
    two ids in one group. among: only pairs with at least one id in it count (e.g. the copies made for a test).
    -> {"precision", "recall", "f1", "predicted_pairs", "true_pairs"}."""
    def pairs(groups: Iterable[Iterable[int]]) -> set[tuple[int, int]]:
        out = set()
        for g in groups:
            g = sorted(set(int(i) for i in g))
            if among is None:
                out.update((a, b) for x, a in enumerate(g) for b in g[x + 1:])
            else:   # only the pairs through a member of among: a large group costs len(group) per such member
                out.update((min(a, b), max(a, b)) for a in g if a in among for b in g if b != a)
        return out

    p, t = pairs(predicted), pairs(truth)
    hit = len(p & t)
    precision = hit / len(p) if p else 1.0
    recall = hit / len(t) if t else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "predicted_pairs": len(p), "true_pairs": len(t)}
