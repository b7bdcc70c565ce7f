"""How good the stored features are on the labelled images: leave-one-out retrieval and kNN, a linear probe, chance."""
from __future__ import annotations

import dataclasses
import html
import logging
import warnings
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from retrieval.catalog import Catalog, weights_label
from retrieval.names import DEFAULT_KS
from retrieval.system import display_name

log = logging.getLogger(__name__)

PROBE_TEST_SHARE = 0.25     # share of the labelled images held out for the linear probe's test
QUERY_CHUNK = 512           # queries per block of the distance matrix


class EvaluationError(ValueError):
    """The index cannot be evaluated as it is (too few labels or images); the message says why."""


class LabelledHit(Protocol):
    label: str | None
    distance: float


# --- the vote, shared by the service's predicted_label and the kNN evaluation ----------------------

def vote_labels(labels: Sequence[Hashable], distances: Sequence[float]) -> tuple[Hashable, int]:
    """Majority vote of neighbours given nearest first. -> (label, votes).

    Ties between labels with the same number of votes go to the label whose votes have the smallest
    summed distance (the closer group); if that is equal too, to the label that appears first.
    """
    assert labels and len(labels) == len(distances), "one distance per label, at least one"
    tally: dict[Hashable, list] = {}   # label -> [votes, summed distance, first rank]
    for rank, (label, d) in enumerate(zip(labels, distances)):
        t = tally.setdefault(label, [0, 0.0, rank])
        t[0] += 1
        t[1] += float(d)
    label, (votes, _, _) = min(tally.items(), key=lambda kv: (-kv[1][0], kv[1][1], kv[1][2]))
    return label, votes


def vote(hits: Sequence[LabelledHit], k: int) -> dict | None:
    """Predict a label from the k nearest hits (nearest first), e.g. retrieval.search.index.Hit.

    Hits without a label do not vote. -> {"label": str, "votes": int, "k": int} where k is the number of
    neighbours that voted (the labelled ones among the first k), or None when none of them has a label.
    Ties: see vote_labels.
    """
    assert k >= 1, f"k must be at least 1, not {k}"
    voters = [h for h in list(hits)[:k] if h.label is not None]
    if not voters:
        return None
    label, votes = vote_labels([h.label for h in voters], [h.distance for h in voters])
    return {"label": label, "votes": votes, "k": len(voters)}


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


# --- the metrics --------------------------------------------------------------------------------------

def check_labels(labels: Sequence[str]) -> dict[str, int]:
    """-> images per label, sorted by label. Raises EvaluationError unless there are >= 2 labels with >= 2 images each."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    counts = dict(sorted(counts.items()))
    if len(counts) < 2:
        found = f"only the label {next(iter(counts))!r}" if counts else "no labelled images"
        raise EvaluationError(
            f"evaluation needs labelled images of at least two classes; the index has {found}. "
            "Index a folder with one subfolder per class (data/<class>/<image>) to label the images.")
    single = [label for label, n in counts.items() if n < 2]
    if single:
        shown = ", ".join(repr(s) for s in single[:10]) + (" ..." if len(single) > 10 else "")
        raise EvaluationError(
            f"every label needs at least two images (one to query, one to find), but {len(single)} "
            f"label(s) have a single image: {shown}. Add images to those classes or remove their folders.")
    return counts


def pairwise_distances(queries: np.ndarray, base: np.ndarray, base_sq: np.ndarray | None = None) -> np.ndarray:
    """Euclidean (not squared) distances. queries shape=(q, d), base shape=(n, d) float32 -> shape=(q, n) float64.

    base_sq: the base's squared norms, shape=(n,) float64, when already computed. The dot products are
    float32 (BLAS), so distances closer than float32 rounding may be ordered either way.
    """
    if base_sq is None:
        base_sq = np.einsum("ij,ij->i", base, base, dtype=np.float64)
    q_sq = np.einsum("ij,ij->i", queries, queries, dtype=np.float64)
    dots = (queries @ base.T).astype(np.float64)                                  # (q, d) x (d, n) -> (q, n)
    return np.sqrt(np.maximum(q_sq[:, None] + base_sq[None, :] - 2.0 * dots, 0.0))


def leave_one_out(vectors: np.ndarray, codes: np.ndarray, ks: Sequence[int],
                  chunk: int = QUERY_CHUNK) -> dict[str, np.ndarray]:
    """Each image queries all the others (its own entry excluded), exact L2 distances.

    vectors: shape=(n, dim) float32; codes: shape=(n,) int class index; ks: neighbour counts, each <= n - 1.
    The ranking sorts by distance; equal distances keep row order (id order from an index; a stable sort).
    -> {"precision": shape=(len(ks), n) float64, precision@k of each query over its k nearest;
        "ap": shape=(n,) float64, average precision over the whole ranking (relevant = same class);
        "predicted": shape=(len(ks), n) int, kNN majority-vote class (vote_labels' tie rule)}.
    """
    n = len(vectors)
    assert vectors.ndim == 2 and codes.shape == (n,), "one class code per vector"
    assert all(1 <= k <= n - 1 for k in ks), f"every k must be in 1..{n - 1}"
    assert np.isfinite(vectors).all(), "vectors must be finite"
    precision = np.zeros((len(ks), n))
    ap = np.zeros(n)
    predicted = np.zeros((len(ks), n), dtype=np.int64)
    kmax = max(ks)
    base_sq = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk))
        d = pairwise_distances(vectors[rows], vectors, base_sq)              # (c, n)
        d[np.arange(len(rows)), rows] = np.inf                               # leave the query itself out
        order = np.argsort(d, axis=1, kind="stable")[:, :n - 1]              # (c, n - 1), self was last
        relevant = codes[order] == codes[rows][:, None]                      # (c, n - 1) bool
        hits = np.cumsum(relevant, axis=1)                                   # relevant among the first r
        for j, k in enumerate(ks):
            precision[j, rows] = hits[:, k - 1] / k
        ranks = np.arange(1, n)
        ap[rows] = (relevant * hits / ranks).sum(1) / relevant.sum(1)
        near = np.take_along_axis(d, order[:, :kmax], axis=1)               # (c, kmax) distances
        near_codes = codes[order[:, :kmax]]
        for r in range(len(rows)):
            for j, k in enumerate(ks):
                predicted[j, rows[r]] = vote_labels(near_codes[r, :k].tolist(), near[r, :k].tolist())[0]
    return {"precision": precision, "ap": ap, "predicted": predicted}


def linear_probe(vectors: np.ndarray, codes: np.ndarray, seed: int, test_share: float = PROBE_TEST_SHARE) -> dict:
    """Logistic regression on standardised features, stratified train/test split (seeded).

    vectors: shape=(n, dim) float32; codes: shape=(n,) int, every class with >= 2 images.
    -> {"train": n_train, "test": n_test, "y_test": shape=(n_test,), "predicted": shape=(n_test,), "converged": bool}.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n, classes = len(codes), len(np.unique(codes))
    n_test = min(n - classes, max(classes, round(test_share * n)))   # each side needs every class
    x_train, x_test, y_train, y_test = train_test_split(vectors, codes, test_size=n_test, stratify=codes,
                                                        random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        probe.fit(x_train, y_train)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return {"train": len(y_train), "test": len(y_test), "y_test": y_test, "predicted": probe.predict(x_test),
            "converged": converged}


def evaluate_vectors(vectors: np.ndarray, labels: Sequence[str], ks: Sequence[int] = DEFAULT_KS, *, seed: int = 0,
                     probe: bool = True, unlabelled: int = 0) -> dict:
    """All the numbers of `evaluate-index` for labelled vectors, as one JSON-ready dict.

    vectors: shape=(n, dim) float32 (as stored); labels: n class names; ks: neighbour counts, those
    above n - 1 are left out with a note. Keys (k-keyed maps use str(k)):
      images {labelled, unlabelled, classes}, labels [names], counts {label: images}, ks [ints],
      retrieval {precision_at_k {k: mean}, map}, knn {accuracy {k: rate}, k, confusion [[...]]},
      linear_probe {accuracy, train, test, seed, converged, confusion [[...]]} or None,
      per_class {label: {images, precision_at_k {k}, average_precision, knn_accuracy {k}, probe_accuracy}},
      chance {retrieval_precision, majority_class, uniform}, notes [str].
    Confusion matrices: rows = true label, columns = predicted, both in `labels` order; the kNN one is
    leave-one-out at the largest k. Raises EvaluationError (fewer than 2 labels, a label with 1 image).
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, recall_score

    counts = check_labels(labels)
    names = list(counts)
    position = {name: c for c, name in enumerate(names)}
    codes = np.array([position[label] for label in labels], dtype=np.int64)
    n = len(labels)
    vectors = np.asarray(vectors, dtype=np.float32)
    assert vectors.shape[0] == n, "one label per vector"
    notes = []
    ks = sorted(set(int(k) for k in ks))
    assert ks and ks[0] >= 1, "k values must be positive"
    too_big = [k for k in ks if k > n - 1]
    if too_big:
        notes.append(f"k = {', '.join(map(str, too_big))} left out: {n} labelled images give at most {n - 1} neighbours")
        ks = [k for k in ks if k <= n - 1]
    if unlabelled:
        notes.append(f"{unlabelled} unlabelled image(s) left out (neither queries nor neighbours)")

    loo = leave_one_out(vectors, codes, ks)
    sizes = np.array([counts[name] for name in names])
    label_ids = list(range(len(names)))
    knn_conf = confusion_matrix(codes, loo["predicted"][-1], labels=label_ids)
    knn_recall = {k: recall_score(codes, loo["predicted"][j], labels=label_ids, average=None, zero_division=0.0)
                  for j, k in enumerate(ks)}

    per_class = {}
    for c, name in enumerate(names):
        mine = codes == c
        per_class[name] = {
            "images": int(sizes[c]),
            "precision_at_k": {str(k): float(loo["precision"][j, mine].mean()) for j, k in enumerate(ks)},
            "average_precision": float(loo["ap"][mine].mean()),
            "knn_accuracy": {str(k): float(knn_recall[k][c]) for k in ks},
            "probe_accuracy": None,
        }

    probe_result = None
    if probe:
        p = linear_probe(vectors, codes, seed)
        recall = recall_score(p["y_test"], p["predicted"], labels=label_ids, average=None, zero_division=0.0)
        tested = np.bincount(p["y_test"], minlength=len(names))
        for c, name in enumerate(names):
            per_class[name]["probe_accuracy"] = float(recall[c]) if tested[c] else None
        probe_result = {"accuracy": float(accuracy_score(p["y_test"], p["predicted"])), "train": p["train"],
                        "test": p["test"], "seed": seed, "converged": p["converged"],
                        "confusion": confusion_matrix(p["y_test"], p["predicted"], labels=label_ids).tolist()}
        if not p["converged"]:
            notes.append("the linear probe's solver did not fully converge (2000 iterations)")

    return {
        "images": {"labelled": n, "unlabelled": int(unlabelled), "classes": len(names)},
        "labels": names,
        "counts": counts,
        "ks": ks,
        "retrieval": {"precision_at_k": {str(k): float(loo["precision"][j].mean()) for j, k in enumerate(ks)},
                      "map": float(loo["ap"].mean())},
        "knn": {"accuracy": {str(k): float(accuracy_score(codes, loo["predicted"][j])) for j, k in enumerate(ks)},
                "k": ks[-1], "confusion": knn_conf.tolist()},
        "linear_probe": probe_result,
        "per_class": per_class,
        "chance": chance_levels(sizes),
        "notes": notes,
    }


def chance_levels(sizes: np.ndarray) -> dict[str, float]:
    """Chance levels for class sizes, shape=(C,).

    retrieval_precision: the expected precision (at any k) of a random ranking, leave-one-out:
      sum_c n_c (n_c - 1) / (n (n - 1)); mAP of a random ranking is about the same.
    majority_class: accuracy of always answering the largest class (max n_c / n).
    uniform: accuracy of a uniformly random guess among the classes (1 / C).
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    n = sizes.sum()
    return {"retrieval_precision": float((sizes * (sizes - 1)).sum() / (n * (n - 1))),
            "majority_class": float(sizes.max() / n), "uniform": float(1.0 / len(sizes))}


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
    about = {"dir": str(index_dir), "model": settings.model, "layer": settings.layer, "weights": settings.weights,
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


# --- a chart for pages ------------------------------------------------------------------------------

def precision_at_k_svg(result: dict, *, width: int = 360, height: int = 200) -> str:
    """An inline SVG bar chart of precision@k from an evaluate_* result, with the chance level as a dashed line."""
    points = result["retrieval"]["precision_at_k"]
    chance = result["chance"]["retrieval_precision"]
    left, right, top, bottom = 36, 8, 12, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    y = lambda v: top + plot_h * (1.0 - v)  # noqa: E731 - value 0..1 -> pixel row
    slot = plot_w / max(1, len(points))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="precision at k">',
             f'<line x1="{left}" y1="{y(0):.1f}" x2="{width - right}" y2="{y(0):.1f}" stroke="#333"/>']
    for tick in (0.0, 0.5, 1.0):
        parts.append(f'<text x="{left - 4}" y="{y(tick) + 4:.1f}" font-size="11" text-anchor="end">{tick:.1f}</text>')
    for i, (k, v) in enumerate(points.items()):
        x = left + i * slot + slot * 0.2
        parts.append(f'<rect x="{x:.1f}" y="{y(v):.1f}" width="{slot * 0.6:.1f}" height="{plot_h * v:.1f}" '
                     f'fill="#4a7bd0"><title>precision@{html.escape(k)}: {v:.3f}</title></rect>')
        parts.append(f'<text x="{x + slot * 0.3:.1f}" y="{y(v) - 3:.1f}" font-size="11" text-anchor="middle">{v:.2f}</text>')
        parts.append(f'<text x="{x + slot * 0.3:.1f}" y="{height - bottom + 14}" font-size="11" '
                     f'text-anchor="middle">P@{html.escape(k)}</text>')
    parts.append(f'<line x1="{left}" y1="{y(chance):.1f}" x2="{width - right}" y2="{y(chance):.1f}" stroke="#c33" '
                 f'stroke-dasharray="4 3"><title>chance: {chance:.3f}</title></line>')
    parts.append(f'<text x="{width - right}" y="{y(chance) - 3:.1f}" font-size="10" fill="#c33" '
                 f'text-anchor="end">chance {chance:.2f}</text>')
    parts.append("</svg>")
    return "".join(parts)
