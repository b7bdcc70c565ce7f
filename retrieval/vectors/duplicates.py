"""Near-duplicate groups from feature vectors, as pure functions of arrays (the whitening they are compared in is
retrieval.vectors.whitening's learn_whitening): pairs within a distance threshold (FAISS range search or k-NN),
groups (complete linkage within the pairs' connected components, or the components themselves), the threshold
chosen from copy and non-copy distances, and pair precision/recall/F1 against known groups."""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Iterable, Sequence

import faiss
import numpy as np

log = logging.getLogger(__name__)

DEFAULT_WHITEN_DIM = 32     # dimensions kept by the grouping's whitening (16-192 measured; see docs/duplicates.md)
# grouping rule -> the calibration's F-beta that goes with it (chosen together on bench_duplicates' seed 0, see
# docs/duplicates.md): "complete" (every two images of a group closer than the threshold) takes the balanced cut;
# "connected" (pairs joined through each other) needs precision weighed double, as one false pair merges two groups
GROUPING_BETA = {"complete": 1.0, "connected": 0.5}
DEFAULT_GROUPING = "complete"
CAUTION_NEIGHBOUR_SHARE = 0.02   # above this share of the images' nearest others under the threshold, say so
STRICT_NEIGHBOUR_SHARE = 0.01    # ... and suggest the threshold that keeps it under this
LINKAGE_MAX = 4096          # complete linkage takes a component of up to this many rows at once (m^2 / 2 distances)
WHITEN_TRAIN_MAX = 50_000   # vectors the whitening is learned on (a random sample above that)
MIN_WHITENED = 32           # fewer images are grouped by their raw unit vectors, not whitened (measured: docs/duplicates.md)
EXACT_MAX = 50_000          # up to this many vectors the pairs come from an exact range search; above, IVF k-NN
APPROX_K = 16               # neighbours looked at per vector by the approximate (k-NN) search
# results the exact range search may hold (each pair twice, and each row itself): a loose threshold (1.99 on 8,000
# images) made it return every pair, 4.4 GB; past this many, each row's APPROX_K nearest are taken instead (exact)
RANGE_RESULTS_MAX = 5_000_000


def close_pairs(vectors: np.ndarray, threshold: float, *, exact_max: int = EXACT_MAX,
                k: int = APPROX_K, range_results_max: int = RANGE_RESULTS_MAX) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) of rows of vectors shape=(n, d) float32 at L2 distance below threshold
    -> (pairs shape=(p, 2) int64, distances shape=(p,) float32).

    Up to exact_max rows: an exact FAISS range search (all pairs), unless the threshold is so loose that it finds
    more than range_results_max results: then each row's k nearest, exactly. Above exact_max: an IVF index and each
    row's k nearest. (With k nearest, a pair both ends miss is missed; groups still join through their other
    members.)"""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    if n < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    radius = float(threshold) ** 2   # FAISS L2 indexes work in squared distances
    if n <= exact_max:
        index = faiss.IndexFlatL2(d)
        index.add(x)
        found = _range_search(index, x, radius, range_results_max)
        if found is None:
            log.info("threshold %g links more than %d pairs: each image's %d nearest instead", threshold,
                     range_results_max // 2, k)
            rows, dist, nbr = _nearest(index, x, radius, k)
        else:
            rows, dist, nbr = found
    else:
        nlist = int(min(65536, max(64, 4 * np.sqrt(n))))
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist)
        rng = np.random.default_rng(0)
        index.train(x[rng.choice(n, size=min(n, 40 * nlist), replace=False)])   # FAISS wants 39+ per list
        index.add(x)
        index.nprobe = 16
        rows, dist, nbr = _nearest(index, x, radius, k)
    keep = rows != nbr                                                    # no self pairs; each pair as (i < j):
    pairs = np.sort(np.stack([rows[keep], nbr[keep]], axis=1), axis=1)   # k-NN finds some from one end only
    dists = np.sqrt(np.maximum(dist[keep], 0)).astype(np.float32)
    if len(pairs):   # found from both ends (the range search finds every pair so)
        pairs, first = np.unique(pairs, axis=0, return_index=True)
        dists = dists[first]
    return pairs, dists


def _range_search(index: faiss.Index, x: np.ndarray, radius: float, max_results: int,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Every (row, neighbour) of x within radius (squared L2) -> (rows, squared distances, neighbours), or None once
    more than max_results are found: searched a block of rows at a time, no block able to hold many more."""
    n = len(x)
    block = max(1, min(n, max_results // n))
    rows, dists, nbrs, total = [], [], [], 0
    for start in range(0, n, block):
        lims, dist, nbr = index.range_search(x[start:start + block], radius)
        total += len(nbr)
        if total > max_results:
            return None
        rows.append(start + np.repeat(np.arange(len(lims) - 1, dtype=np.int64), np.diff(lims).astype(np.int64)))
        dists.append(dist)
        nbrs.append(nbr.astype(np.int64))
    return np.concatenate(rows), np.concatenate(dists), np.concatenate(nbrs)


def _nearest(index: faiss.Index, x: np.ndarray, radius: float, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's k nearest others within radius (squared L2) -> (rows, squared distances, neighbours)."""
    dist, nbr = index.search(x, min(k + 1, len(x)))                        # (n, k+1): itself among them
    rows = np.repeat(np.arange(len(x), dtype=np.int64), dist.shape[1])
    dist, nbr = dist.ravel(), nbr.ravel().astype(np.int64)
    keep = (nbr >= 0) & (dist < radius)
    return rows[keep], dist[keep], nbr[keep]


def _components(n: int, pairs: np.ndarray) -> list[np.ndarray]:
    """Rows 0..n-1 joined by pairs shape=(p, 2) int64 -> the connected components of two or more rows, each an
    ascending array."""
    import scipy.sparse
    from scipy.sparse.csgraph import connected_components

    graph = scipy.sparse.coo_matrix((np.ones(len(pairs), np.int32), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    order = np.argsort(labels, kind="stable")                       # rows by component, ascending within one
    starts = np.flatnonzero(np.r_[True, np.diff(labels[order]) != 0])
    sizes = np.diff(np.r_[starts, n])
    return [order[s:s + k] for s, k in zip(starts[sizes > 1], sizes[sizes > 1])]


def _as_pairs(pairs: Iterable[Sequence[int]]) -> np.ndarray:
    """Pairs as an array shape=(p, 2) int64 (an array passes through)."""
    return np.asarray([tuple(p) for p in pairs] if not isinstance(pairs, np.ndarray) else pairs,
                      dtype=np.int64).reshape(-1, 2)


def connected_groups(n: int, pairs: Iterable[Sequence[int]]) -> list[list[int]]:
    """Rows 0..n-1 joined by pairs, through each other -> the groups of two or more rows (each sorted; groups by their
    first row). A chain a~b~c is one group however far a is from c."""
    return sorted((c.tolist() for c in _components(n, _as_pairs(pairs))), key=lambda g: g[0])


def complete_groups(vectors: np.ndarray, pairs: Iterable[Sequence[int]], threshold: float, *,
                    linkage_max: int = LINKAGE_MAX) -> list[list[int]]:
    """Rows of vectors shape=(n, d) float32 joined by pairs (closer than threshold), split so that every two rows of a
    group are closer than threshold: complete linkage (scipy), cut below threshold -> the groups of two or more rows
    (each sorted; groups by their first row). A chain a~b~c with a and c threshold or more apart is not one group.

    Worked per connected component of the pairs (most rows are in none, most components are pairs). A component of
    more than linkage_max rows (thousands of images all alike) is cut into runs of linkage_max rows in
    breadth-first order from its best-connected row first, each linked alone: its groups hold at most linkage_max."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    pairs = _as_pairs(pairs)
    below = float(np.nextafter(np.float64(threshold), 0))   # fcluster keeps merges <= t; the pairs are < threshold
    groups = []
    for comp in _components(len(vectors), pairs):
        if len(comp) == 2:      # its one pair is under the threshold
            groups.append(comp.tolist())
            continue
        parts = [comp]
        if len(comp) > linkage_max:
            log.warning("%d images are all joined by near-duplicate pairs; grouped %d at a time", len(comp),
                        linkage_max)
            parts = _runs(comp, pairs, linkage_max)
        for part in parts:
            if len(part) < 2:
                continue
            labels = fcluster(linkage(pdist(vectors[part].astype(np.float64)), method="complete"), t=below,
                              criterion="distance")                  # (m,) a flat cluster number per row
            for label in np.unique(labels):
                members = np.sort(part[labels == label])
                if len(members) > 1:
                    groups.append(members.tolist())
    return sorted(groups, key=lambda g: g[0])


def _runs(comp: np.ndarray, pairs: np.ndarray, size: int) -> list[np.ndarray]:
    """The rows of one large component in breadth-first order from its row with the most pairs, cut every size."""
    import scipy.sparse
    from scipy.sparse.csgraph import breadth_first_order

    inside = pairs[np.isin(pairs[:, 0], comp)]                        # both ends are in comp when one is
    a, b = np.searchsorted(comp, inside[:, 0]), np.searchsorted(comp, inside[:, 1])   # comp is ascending
    graph = scipy.sparse.coo_matrix((np.ones(len(a), np.int32), (a, b)), shape=(len(comp), len(comp))).tocsr()
    start = int(np.argmax(np.bincount(np.r_[a, b], minlength=len(comp))))
    order = breadth_first_order(graph, start, directed=False, return_predecessors=False)
    return [comp[order[s:s + size]] for s in range(0, len(order), size)]


GROUPINGS = {"complete": complete_groups,
             "connected": lambda vectors, pairs, threshold: connected_groups(len(vectors), pairs)}


@dataclasses.dataclass(frozen=True)
class ThresholdChoice:
    """A distance threshold chosen from the distances of known copies and of the collection's nearest neighbours."""
    threshold: float
    copies: int              # copy distances it was chosen from
    neighbours: int          # nearest-neighbour distances it was chosen from
    copy_rate: float         # estimated share of the neighbour distances that are copies (see choose_threshold)
    group_size: float        # images per copy group the collection seems to hold (2: an image and one copy)
    copy_recall: float       # share of the copy distances below the threshold
    neighbour_share: float   # share of the neighbour distances below it (copies or not)
    strict_threshold: float  # the highest cut with at most STRICT_NEIGHBOUR_SHARE of the neighbours under it
    strict_copy_recall: float   # share of the copy distances below strict_threshold

    def to_json(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


def choose_threshold(copy_distances: np.ndarray, neighbour_distances: np.ndarray,
                     beta: float = GROUPING_BETA[DEFAULT_GROUPING],
                     sibling_distances: np.ndarray | None = None) -> ThresholdChoice:
    """The threshold with the best expected pair F-beta in the collection the distances come from.

    copy_distances shape=(p,): made copies to their image; neighbour_distances: images to their nearest other
    images, a mix of the collection's own copies (if it holds any) and of other pictures, shape=(q,), or one row
    per image shape=(m, k) (inf where a row has fewer). The share of the neighbours that are copies, copy_rate, is
    estimated as twice the share shorter than the median copy distance (as if the collection's copies lay as close
    as the made ones; other pictures that close count as copies too, so it errs towards more). At a cut t the
    expected true pairs are then copy_rate * q * (copies under t), the false ones the rest of the neighbours under t;
    the cut maximising F-beta of those is the threshold (beta < 1 weighs precision above recall: GROUPING_BETA).
    With no neighbour as close as a copy (copy_rate 0) it is the highest cut with no neighbour under it.

    Copies in groups. With sibling_distances shape=(s,) (two copies of one image to each other) and neighbours in
    rows, the images with a neighbour under that first cut say how large the collection's copy groups are: g, one
    more than their mean number of such neighbours. Of the g (g - 1) / 2 pairs of a group of one image and g - 1
    copies, only g - 1 are an image and its copy (a share w = 2 / g); the others are two copies, further apart. So
    where g > 2 the copies' distances are taken as w parts copy distances and 1 - w parts sibling distances, the copy
    rate as the share under the median copy distance divided by the share of that mixture under it, and the cut is
    chosen again. Where copies come singly (g <= 2: no image has two neighbours that close) nothing changes.
    Distances: L2 between whitened vectors."""
    pos = np.sort(np.asarray(copy_distances, dtype=np.float64))
    rows = np.asarray(neighbour_distances, dtype=np.float64)
    neg = np.sort(rows[np.isfinite(rows)])
    assert len(pos) > 0, "no copy distances to calibrate on"
    rate = min(1.0, 2 * float(np.mean(neg < np.median(pos)))) if len(neg) else 1.0
    choice = _best_cut(pos, neg, rate, beta, lambda cuts: _share_under(pos, cuts), pos)
    if sibling_distances is None or rows.ndim != 2 or not len(sibling_distances) or not len(neg):
        return choice
    close = np.sum(rows < choice.threshold, axis=1)
    g = 1 + float(close[close > 0].mean()) if (close > 0).any() else 2.0
    if g <= 2:
        return choice
    w = 2 / g
    sib = np.sort(np.asarray(sibling_distances, dtype=np.float64))
    median = np.median(pos)
    rate = min(1.0, float(np.mean(neg < median) / (0.5 * w + (1 - w) * _share_under(sib, median))))
    return _best_cut(np.concatenate([pos, sib]), neg, rate, beta,
                     lambda cuts: w * _share_under(pos, cuts) + (1 - w) * _share_under(sib, cuts), pos, group_size=g)


def _share_under(sorted_values: np.ndarray, at: np.ndarray | float) -> np.ndarray | float:
    """The share of sorted_values at or below each of at."""
    return np.searchsorted(sorted_values, at, side="right") / len(sorted_values)


def _best_cut(points: np.ndarray, neg: np.ndarray, rate: float, beta: float,
              copy_share: Callable[[np.ndarray], np.ndarray], made: np.ndarray,
              group_size: float = 2.0) -> ThresholdChoice:
    """choose_threshold's cut among cuts between the distances in points and neg (the neighbour distances, sorted,
    a share rate of them copies), the copies' share under each cut being copy_share(cuts); made (sorted): the made
    copies' distances to their images, whose share under the cut is reported."""
    cuts = np.unique(np.concatenate([points, neg]))
    cuts = (cuts[:-1] + cuts[1:]) / 2 if len(cuts) > 1 else cuts + 1e-6   # between observed distances
    fp = np.searchsorted(neg, cuts, side="right")
    copies = rate * len(neg) if len(neg) else float(len(made))           # expected copy pairs among the neighbours
    true = copies * copy_share(cuts)                                     # (cuts,) expected true pairs under each cut
    false = np.maximum(0.0, fp - true) if len(neg) else np.zeros(len(cuts))
    precision, recall = true / np.maximum(true + false, 1e-12), true / max(copies, 1e-12)
    score = (1 + beta ** 2) * precision * recall / np.maximum(beta ** 2 * precision + recall, 1e-12)
    if score.max() > 0:
        best = int(np.argmax(score))
    else:   # no neighbour as close as a copy: as far as it goes without joining one
        clear = np.flatnonzero(fp == 0)
        best = int(clear[-1]) if len(clear) else 0
    t = float(cuts[best])
    # the cut for a collection whose images lie as close to each other as to their copies (no precision to trade)
    allowed = fp <= STRICT_NEIGHBOUR_SHARE * len(neg)
    strict = min(t, float(cuts[int(np.flatnonzero(allowed)[-1]) if allowed.any() else 0]))
    return ThresholdChoice(t, len(made), len(neg), rate, group_size, float(_share_under(made, t)),
                           float(fp[best] / len(neg)) if len(neg) else 0.0, strict, float(_share_under(made, strict)))


def nearest_distance_rows(vectors: np.ndarray, rows: np.ndarray, k: int, same_file: Sequence[Sequence[int]] = (),
                          ) -> np.ndarray:
    """The distances from each of rows of vectors shape=(n, d) float32 to its k nearest other rows, rows holding the
    same file as it (same_file: lists of rows) left out -> shape=(len(rows), k) float64, ascending, inf where fewer
    (exact FAISS search, rows in chunks)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    twin = {r: g for g in same_file for r in g}
    reach = min(len(x), k + max((len(g) for g in same_file), default=1))   # enough to skip itself and its twins
    out = np.full((len(rows), k), np.inf)
    for s in range(0, len(rows), 1024):
        part = np.asarray(rows[s:s + 1024], dtype=np.int64)
        dist, nbr = index.search(x[part], reach)                         # (m, reach) squared distances
        for i, (row, d, nb) in enumerate(zip(part, dist, nbr)):
            skip = set(twin.get(int(row), (int(row),)))
            kept = [v for v, j in zip(d, nb) if j >= 0 and int(j) not in skip][:k]
            out[s + i, :len(kept)] = np.sqrt(np.maximum(np.asarray(kept, dtype=np.float64), 0))
    return out


def nearest_distances(vectors: np.ndarray, rows: np.ndarray, k: int, same_file: Sequence[Sequence[int]] = (),
                      ) -> np.ndarray:
    """nearest_distance_rows, every distance in one array -> shape=(m,) float64, m <= len(rows) * k."""
    out = nearest_distance_rows(vectors, rows, k, same_file)
    return out[np.isfinite(out)]


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
