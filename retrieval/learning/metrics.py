"""Evaluation metrics, pure functions of arrays: the kNN vote, leave-one-out precision and mAP, a linear probe, chance levels."""
from __future__ import annotations

import collections
import warnings
from collections.abc import Hashable, Sequence
from typing import Protocol

import numpy as np

from retrieval.names import DEFAULT_KS
from retrieval.system import display_name

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
    """Predict a label from the k nearest hits (nearest first), e.g. retrieval.search.snapshot.Hit.

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


# --- the metrics --------------------------------------------------------------------------------------

def check_labels(labels: Sequence[str], queries: np.ndarray | None = None) -> dict[str, int]:
    """-> images per label, sorted by label. Raises EvaluationError unless there are >= 2 labels and every query's
    label has >= 2 images (itself and one to find). queries: shape=(n,) bool, the images that query (None: all)."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    counts = dict(sorted(counts.items()))
    if len(counts) < 2:
        found = f"only the label '{display_name(next(iter(counts)))}'" if counts else "no labelled images"
        raise EvaluationError(
            f"evaluation needs labelled images of at least two classes; the index has {found}. "
            "Index a folder with one subfolder per class (data/<class>/<image>) to label the images.")
    asking = set(labels) if queries is None else {label for label, q in zip(labels, queries) if q}
    single = [label for label, n in counts.items() if n < 2 and label in asking]
    if single:
        shown = ", ".join(f"'{display_name(s)}'" for s in single[:10]) + (" ..." if len(single) > 10 else "")
        raise EvaluationError(
            f"every label needs at least two images (one to query, one to find), but {len(single)} "
            f"label(s) have a single image: {shown}. Add images to those classes or remove their folders.")
    return counts


def _single_image_labels(labels: Sequence[str], queries: np.ndarray | None) -> list[str]:
    """The labels of one image, where that image would query (one that does not is only searched, a distractor)."""
    counts = collections.Counter(labels)
    asking = set(labels) if queries is None else {label for label, q in zip(labels, queries) if q}
    return sorted(label for label, n in counts.items() if n == 1 and label in asking)


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


def leave_one_out(vectors: np.ndarray, codes: np.ndarray, ks: Sequence[int], chunk: int = QUERY_CHUNK,
                  queries: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Each query image searches all the other images (its own entry excluded), exact L2 distances.

    vectors: shape=(n, dim) float32; codes: shape=(n,) int class index; ks: neighbour counts, each <= n - 1;
    queries: shape=(q,) int, the rows that query (None: every row); every row is searched.
    The ranking sorts by distance; equal distances keep row order (id order from an index; a stable sort).
    -> {"precision": shape=(len(ks), q) float64, precision@k of each query over its k nearest;
        "ap": shape=(q,) float64, average precision over the whole ranking (relevant = same class);
        "predicted": shape=(len(ks), q) int, kNN majority-vote class (vote_labels' tie rule)}.
    """
    n = len(vectors)
    assert vectors.ndim == 2 and codes.shape == (n,), "one class code per vector"
    assert all(1 <= k <= n - 1 for k in ks), f"every k must be in 1..{n - 1}"
    assert np.isfinite(vectors).all(), "vectors must be finite"
    queries = np.arange(n) if queries is None else np.asarray(queries, dtype=np.int64)
    q = len(queries)
    precision = np.zeros((len(ks), q))
    ap = np.zeros(q)
    predicted = np.zeros((len(ks), q), dtype=np.int64)
    kmax = max(ks)
    base_sq = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
    for start in range(0, q, chunk):
        rows = np.arange(start, min(q, start + chunk))                       # positions among the queries
        d = pairwise_distances(vectors[queries[rows]], vectors, base_sq)     # (c, n)
        d[np.arange(len(rows)), queries[rows]] = np.inf                      # leave the query itself out
        order = np.argsort(d, axis=1, kind="stable")[:, :n - 1]              # (c, n - 1), self was last
        relevant = codes[order] == codes[queries[rows]][:, None]             # (c, n - 1) bool
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


def query_scores(queries: np.ndarray, query_codes: np.ndarray, base: np.ndarray, base_codes: np.ndarray,
                 k: int, chunk: int = QUERY_CHUNK) -> dict[str, float]:
    """Held-out retrieval: each query searches the base (exact L2; no query is in the base).

    queries: shape=(q, dim) float32, query_codes: shape=(q,) int; base: shape=(n, dim) float32, base_codes: shape=(n,)
    int, with every query's class among them; k <= n. The ranking sorts by distance, equal distances in base order.
    -> {"knn_accuracy": share of queries whose k nearest vote (vote_labels) their class, "map": mean average
        precision over the whole ranking (relevant = same class), "k": k, "queries": q}.
    """
    n = len(base)
    assert queries.ndim == base.ndim == 2 and query_codes.shape == (len(queries),) and base_codes.shape == (n,)
    assert 1 <= k <= n, f"k must be in 1..{n}"
    assert np.isin(query_codes, base_codes).all(), "every query's class must be in the base"
    correct, ap_sum = 0, 0.0
    base_sq = np.einsum("ij,ij->i", base, base, dtype=np.float64)
    ranks = np.arange(1, n + 1)
    for start in range(0, len(queries), chunk):
        rows = np.arange(start, min(len(queries), start + chunk))
        d = pairwise_distances(queries[rows], base, base_sq)                 # (c, n)
        order = np.argsort(d, axis=1, kind="stable")                          # (c, n)
        relevant = base_codes[order] == query_codes[rows][:, None]            # (c, n) bool
        ap_sum += float(((relevant * np.cumsum(relevant, axis=1) / ranks).sum(1) / relevant.sum(1)).sum())
        near = np.take_along_axis(d, order[:, :k], axis=1)                   # (c, k)
        for r in range(len(rows)):
            label, _ = vote_labels(base_codes[order[r, :k]].tolist(), near[r].tolist())
            correct += int(label == query_codes[rows[r]])
    q = len(queries)
    return {"knn_accuracy": correct / q, "map": ap_sum / q, "k": k, "queries": q}


def linear_probe(vectors: np.ndarray, codes: np.ndarray, seed: int, test_share: float = PROBE_TEST_SHARE,
                 test_rows: np.ndarray | None = None) -> dict:
    """Logistic regression on standardised features, stratified train/test split (seeded), or tested on test_rows
    (shape=(t,) int) and trained on all the other rows.

    vectors: shape=(n, dim) float32; codes: shape=(n,) int, every class with >= 2 images (seeded split) or at least
    two classes among the training rows (test_rows).
    -> {"train": n_train, "test": n_test, "y_test": shape=(n_test,), "predicted": shape=(n_test,), "converged": bool}.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n, classes = len(codes), len(np.unique(codes))
    if test_rows is None:
        n_test = min(n - classes, max(classes, round(test_share * n)))   # each side needs every class
        x_train, x_test, y_train, y_test = train_test_split(vectors, codes, test_size=n_test, stratify=codes,
                                                            random_state=seed)
    else:
        testing = np.zeros(n, dtype=bool)
        testing[test_rows] = True
        x_train, x_test, y_train, y_test = vectors[~testing], vectors[testing], codes[~testing], codes[testing]
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        probe.fit(x_train, y_train)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return {"train": len(y_train), "test": len(y_test), "y_test": y_test, "predicted": probe.predict(x_test),
            "converged": converged}


def _probe_test_rows(codes: np.ndarray, asking: np.ndarray, seed: int) -> tuple[np.ndarray, list[int]]:
    """The rows a held-out linear probe is tested on: the queries, less a seeded half (at least one) of those of each
    label with no image among the other rows, which train it instead: a probe cannot predict a label it never saw
    (a class folder added after fine-tuning had probe accuracy 0 and pulled the whole probe down).
    -> (test rows, shape=(t,) int; the labels that lent images)."""
    rng = np.random.default_rng(seed)
    trained = set(np.unique(codes[~asking]).tolist())
    rows = np.flatnonzero(asking)
    lent_rows, lent = [], []
    for c in np.unique(codes[rows]).tolist():
        if c in trained:
            continue
        mine = rng.permutation(rows[codes[rows] == c])
        lent_rows.extend(mine[:max(1, len(mine) // 2)].tolist())
        lent.append(c)
    return (np.setdiff1d(rows, lent_rows) if lent_rows else rows), lent


def evaluate_vectors(vectors: np.ndarray, labels: Sequence[str], ks: Sequence[int] = DEFAULT_KS, *, seed: int = 0,
                     probe: bool = True, unlabelled: int = 0, queries: np.ndarray | None = None) -> dict:
    """All the numbers of `evaluate-index` for labelled vectors, as one JSON-ready dict.

    vectors: shape=(n, dim) float32 (as stored); labels: n class names; ks: neighbour counts, those
    above n - 1 are left out with a note. queries: shape=(n,) bool, the images evaluated (held out); None: all.
    Every image is searched, but only the queries ask: their precision, AP and kNN vote are the numbers, and
    the linear probe trains on the other images and is tested on the queries (with every image querying, it
    uses a seeded stratified split). Keys (k-keyed maps use str(k)):
      images {labelled, unlabelled, classes, single_image_labels (left out)}, evaluated_images (the queries), labels [names], counts {label: images}, ks [ints],
      retrieval {precision_at_k {k: mean}, map}, knn {accuracy {k: rate}, k, confusion [[...]]},
      linear_probe {accuracy, train, test, seed, split ("seeded" | "held_out"), converged, confusion [[...]]} or None,
      per_class {label: {images (queries), precision_at_k {k}, average_precision, knn_accuracy {k}, probe_accuracy}}
      for each label with a query, chance {retrieval_precision, majority_class, uniform}, notes [str].
    A label with a single image that would query is left out, with a note, while two labels with more remain.
    Confusion matrices: rows = true label, columns = predicted, both in `labels` order; the kNN one is
    leave-one-out at the largest k. Raises EvaluationError (fewer than 2 labels with 2 images, no query).
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, recall_score

    alone = _single_image_labels(labels, queries)
    if alone and len(set(labels)) - len(alone) >= 2:   # else check_labels says what the collection lacks
        keep = np.array([label not in alone for label in labels])
        vectors, labels = np.asarray(vectors)[keep], [label for label, k in zip(labels, keep) if k]
        queries = None if queries is None else np.asarray(queries, dtype=bool)[keep]
    n = len(labels)
    asking = np.ones(n, dtype=bool) if queries is None else np.asarray(queries, dtype=bool)
    assert asking.shape == (n,), "one query flag per label"
    counts = check_labels(labels, asking)
    if not asking.any():
        raise EvaluationError(f"none of the {n} labelled images is left to evaluate")
    names = list(counts)
    position = {name: c for c, name in enumerate(names)}
    codes = np.array([position[label] for label in labels], dtype=np.int64)
    rows = np.flatnonzero(asking)                        # (q,) the queries' rows
    q_codes = codes[rows]
    vectors = np.asarray(vectors, dtype=np.float32)
    assert vectors.shape[0] == n, "one label per vector"
    notes = []
    ks = sorted(set(int(k) for k in ks))
    assert ks and ks[0] >= 1, "k values must be positive"
    too_big = [k for k in ks if k > n - 1]
    if too_big and len(too_big) == len(ks):
        raise EvaluationError(f"k = {', '.join(map(str, too_big))} asks for more neighbours than these {n} labelled "
                              f"images give (at most {n - 1} each): ask for k up to {n - 1}, e.g. -k 1,{min(5, n - 1)} "
                              f"(from Python: ks=(1, {min(5, n - 1)}))")
    if too_big:
        notes.append(f"k = {', '.join(map(str, too_big))} left out: {n} labelled images give at most {n - 1} neighbours")
        ks = [k for k in ks if k <= n - 1]
    largest = max(counts.values())
    beyond = [k for k in ks if k > largest - 1]
    if beyond:
        notes.append(f"k = {', '.join(map(str, beyond))} is more than the largest class's {largest - 1} other images: "
                     f"precision@{beyond[0]} can reach at most {(largest - 1) / beyond[0]:.2f} here")
    small = sorted((name for name, count in counts.items() if 1 < count <= ks[-1] // 2 and count < largest),
                   key=lambda name: (counts[name], name))
    if small and not beyond:   # a class of 2 showed kNN@10 0.000 and P@10 0.100 without a word
        shown = ", ".join(f"{name!r} ({counts[name]})" for name in small[:10]) + (" ..." if len(small) > 10 else "")
        notes.append(f"{len(small)} label(s) with {ks[-1] // 2} images or fewer: their kNN@{ks[-1]} vote is hard to "
                     f"win (at most {max(counts[name] for name in small) - 1} of the {ks[-1]} neighbours can "
                     f"be of their class) and their precision@{ks[-1]} is capped: {shown}")
    if unlabelled:
        notes.append(f"{unlabelled} unlabelled image(s) left out (neither queries nor neighbours)")
    if alone and len(counts) >= 2:
        shown = ", ".join(repr(label) for label in alone[:10]) + (" ..." if len(alone) > 10 else "")
        notes.append(f"{len(alone)} label(s) with a single image left out (a query needs another image of its class "
                     f"to find): {shown}")

    loo = leave_one_out(vectors, codes, ks, queries=rows)
    sizes = np.array([counts[name] for name in names])
    asked = np.bincount(q_codes, minlength=len(names))   # queries per label
    label_ids = list(range(len(names)))
    knn_conf = confusion_matrix(q_codes, loo["predicted"][-1], labels=label_ids)
    knn_recall = {k: recall_score(q_codes, loo["predicted"][j], labels=label_ids, average=None, zero_division=0.0)
                  for j, k in enumerate(ks)}

    per_class = {}
    for c, name in enumerate(names):
        mine = q_codes == c
        if not mine.any():
            continue
        per_class[name] = {
            "images": int(asked[c]),
            "precision_at_k": {str(k): float(loo["precision"][j, mine].mean()) for j, k in enumerate(ks)},
            "average_precision": float(loo["ap"][mine].mean()),
            "knn_accuracy": {str(k): float(knn_recall[k][c]) for k in ks},
            "probe_accuracy": None,
        }

    probe_result = None
    held_out = queries is not None and not asking.all()
    probe_rows = rows
    if held_out and probe:
        probe_rows, lent = _probe_test_rows(codes, asking, seed)
        if lent:
            notes.append(f"the linear probe had no training image of {len(lent)} label(s) (added after "
                         f"fine-tuning, or all held out): half of their held-out images (at least one) trained it "
                         f"instead of testing it: {', '.join(repr(names[c]) for c in lent[:10])}"
                         f"{' ...' if len(lent) > 10 else ''}")
    trainable = len(np.unique(np.delete(codes, probe_rows))) >= 2 if held_out else True
    if probe and not trainable:
        notes.append("no linear probe: it trains on the images left out of the queries, and those hold fewer than "
                     "two labels")
    if probe and trainable:
        p = linear_probe(vectors, codes, seed, test_rows=probe_rows if held_out else None)
        recall = recall_score(p["y_test"], p["predicted"], labels=label_ids, average=None, zero_division=0.0)
        tested = np.bincount(p["y_test"], minlength=len(names))
        for c, name in enumerate(names):
            if name in per_class:
                per_class[name]["probe_accuracy"] = float(recall[c]) if tested[c] else None
        probe_result = {"accuracy": float(accuracy_score(p["y_test"], p["predicted"])), "train": p["train"],
                        "test": p["test"], "seed": seed, "split": "held_out" if held_out else "seeded",
                        "converged": p["converged"],
                        "confusion": confusion_matrix(p["y_test"], p["predicted"], labels=label_ids).tolist()}
        if not p["converged"]:
            notes.append("the linear probe's solver did not fully converge (2000 iterations)")

    return {
        "images": {"labelled": n, "unlabelled": int(unlabelled), "classes": len(names),
                   "single_image_labels": len(alone) if alone and len(counts) >= 2 else 0},
        "evaluated_images": len(rows),
        "labels": names,
        "counts": counts,
        "ks": ks,
        "retrieval": {"precision_at_k": {str(k): float(loo["precision"][j].mean()) for j, k in enumerate(ks)},
                      "map": float(loo["ap"].mean())},
        "knn": {"accuracy": {str(k): float(accuracy_score(q_codes, loo["predicted"][j])) for j, k in enumerate(ks)},
                "k": ks[-1], "confusion": knn_conf.tolist()},
        "linear_probe": probe_result,
        "per_class": per_class,
        "chance": chance_levels(sizes, asked),
        "notes": notes,
    }


def chance_levels(sizes: np.ndarray, queries: np.ndarray | None = None) -> dict[str, float]:
    """Chance levels for class sizes, shape=(C,) (images searched), and the queries per class, shape=(C,)
    (None: every image queries).

    retrieval_precision: the expected precision (at any k) of a random ranking, leave-one-out:
      sum_c q_c (n_c - 1) / (q (n - 1)); mAP of a random ranking is about the same.
    majority_class: accuracy of always answering the largest class among the queries (max q_c / q).
    uniform: accuracy of a uniformly random guess among the classes (1 / C).
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    asked = sizes if queries is None else np.asarray(queries, dtype=np.float64)
    n, q = sizes.sum(), asked.sum()
    return {"retrieval_precision": float((asked * (sizes - 1)).sum() / (q * (n - 1))),
            "majority_class": float(asked.max() / q), "uniform": float(1.0 / len(sizes))}
