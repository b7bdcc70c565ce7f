"""Evaluation metrics: checked against brute-force definitions, on seeded synthetic vectors and a sample index."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score

from retrieval.samples import make_sample_collection
from retrieval.catalog import Catalog
from retrieval.learning.evaluation import EvaluationError, evaluate_index, load_labelled_vectors
from retrieval.learning.metrics import (chance_levels, check_labels, evaluate_vectors, leave_one_out, query_scores, vote,
                                       vote_labels)
from retrieval.search.snapshot import Hit


def clusters(n_per_class: list[int], dim: int = 8, spread: float = 1.0, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Gaussian clusters around seeded random centres; labels "c0", "c1", ... shuffled together."""
    rng = np.random.default_rng(seed)
    vecs, labels = [], []
    for c, n in enumerate(n_per_class):
        centre = rng.normal(0, 3, dim)
        vecs.append(centre + rng.normal(0, spread, (n, dim)))
        labels += [f"c{c}"] * n
    order = rng.permutation(len(labels))
    return np.concatenate(vecs)[order].astype(np.float32), [labels[i] for i in order]


def brute_force(vectors: np.ndarray, labels: list, ks: list[int]) -> dict:
    """The definitions, one query at a time: rank the others by (distance, position), nothing vectorised."""
    n = len(labels)
    prec = {k: [] for k in ks}
    aps, votes = [], {k: [] for k in ks}
    for i in range(n):
        others = sorted((math.sqrt(float(((vectors[i].astype(np.float64) - vectors[j]) ** 2).sum())), j)
                        for j in range(n) if j != i)
        rel = [labels[j] == labels[i] for _, j in others]
        for k in ks:
            prec[k].append(sum(rel[:k]) / k)
            counts = Counter(labels[j] for _, j in others[:k])
            top = max(counts.values())
            tied = [lab for lab in counts if counts[lab] == top]
            sums = {lab: sum(d for d, j in others[:k] if labels[j] == lab) for lab in tied}
            best = min(sums.values())
            closest = [lab for lab in tied if sums[lab] == best]
            first = next(labels[j] for _, j in others[:k] if labels[j] in closest)
            votes[k].append(first)
        hits, total = 0, 0.0
        for r, is_rel in enumerate(rel, 1):
            if is_rel:
                hits += 1
                total += hits / r
        aps.append(total / sum(rel))
    return {"precision": prec, "ap": aps, "votes": votes}


def test_leave_one_out_matches_brute_force():
    vectors, labels = clusters([7, 9, 6], spread=2.5, seed=1)       # overlapping, so not every answer is right
    codes = np.array([int(s[1:]) for s in labels])
    ks = [1, 3, 5, 8]
    ours = leave_one_out(vectors, codes, ks, chunk=5)                   # several chunks
    ref = brute_force(vectors, list(codes), ks)
    for j, k in enumerate(ks):
        np.testing.assert_allclose(ours["precision"][j], ref["precision"][k])
        assert ours["predicted"][j].tolist() == ref["votes"][k]
    np.testing.assert_allclose(ours["ap"], ref["ap"])
    assert 0 < ours["precision"][0].mean() < 1


def test_exact_ties_match_brute_force():
    """Small-integer vectors give exact distances, so many ties: the ranking keeps id order, the vote uses the rule."""
    rng = np.random.default_rng(3)
    vectors = rng.integers(0, 3, (24, 3)).astype(np.float32)
    codes = rng.integers(0, 3, 24)
    ks = [1, 2, 4, 6]
    ours = leave_one_out(vectors, codes, ks)
    ref = brute_force(vectors, list(codes), ks)
    for j, k in enumerate(ks):
        np.testing.assert_allclose(ours["precision"][j], ref["precision"][k])
        assert ours["predicted"][j].tolist() == ref["votes"][k]
    np.testing.assert_allclose(ours["ap"], ref["ap"])


def test_average_precision_agrees_with_sklearn():
    vectors, labels = clusters([5, 6, 7], spread=3.0, seed=4)
    codes = np.array([int(s[1:]) for s in labels])
    ap = leave_one_out(vectors, codes, [1])["ap"]
    for i in range(len(codes)):
        others = np.arange(len(codes)) != i
        dist = np.linalg.norm(vectors[others] - vectors[i], axis=1)
        assert ap[i] == pytest.approx(average_precision_score(codes[others] == codes[i], -dist))


def test_vote_labels_tie_rules():
    assert vote_labels(["a", "b", "b"], [0.1, 5.0, 5.0]) == ("b", 2)               # votes first
    assert vote_labels(["a", "b", "a", "b"], [1.0, 2.0, 3.0, 4.0]) == ("a", 2)     # tie: smaller summed distance
    assert vote_labels(["b", "a", "a", "b"], [1.0, 1.5, 1.6, 3.0]) == ("a", 2)     # even if the nearest is a "b"
    assert vote_labels(["b", "a"], [1.0, 1.0]) == ("b", 1)                         # all equal: the first one


def test_vote_on_hits():
    hits = [Hit(1, "x/1.jpg", "cats", 0.1), Hit(2, "2.jpg", None, 0.2), Hit(3, "y/3.jpg", "dogs", 0.3),
            Hit(4, "x/4.jpg", "cats", 0.4), Hit(5, "y/5.jpg", "dogs", 0.5), Hit(6, "y/6.jpg", "dogs", 0.6)]
    assert vote(hits, 4) == {"label": "cats", "votes": 2, "k": 3}       # the unlabelled hit does not vote
    assert vote(hits, 10) == {"label": "dogs", "votes": 3, "k": 5}
    assert vote(hits[:2], 2) == {"label": "cats", "votes": 1, "k": 1}
    assert vote([hits[1]], 5) is None and vote([], 5) is None


def test_evaluate_vectors_separable_classes():
    vectors, labels = clusters([6, 8, 10], spread=0.3, seed=2)
    r = evaluate_vectors(vectors, labels, [1, 5], seed=0)
    assert r["labels"] == ["c0", "c1", "c2"] and r["counts"] == {"c0": 6, "c1": 8, "c2": 10}
    assert r["images"] == {"labelled": 24, "unlabelled": 0, "classes": 3, "single_image_labels": 0}
    assert r["retrieval"]["precision_at_k"] == {"1": 1.0, "5": 1.0} and r["retrieval"]["map"] == 1.0
    assert r["knn"]["accuracy"] == {"1": 1.0, "5": 1.0} and r["knn"]["k"] == 5
    assert r["knn"]["confusion"] == [[6, 0, 0], [0, 8, 0], [0, 0, 10]]
    probe = r["linear_probe"]
    assert probe["accuracy"] == 1.0 and probe["train"] + probe["test"] == 24 and probe["converged"]
    assert np.diag(probe["confusion"]).min() >= 1                    # stratified: every class is tested
    assert r["per_class"]["c1"]["knn_accuracy"] == {"1": 1.0, "5": 1.0}
    assert r["chance"] == pytest.approx({"retrieval_precision": (30 + 56 + 90) / (24 * 23),
                                         "majority_class": 10 / 24, "uniform": 1 / 3})
    assert r["notes"] == []


def test_evaluate_vectors_summaries_are_consistent():
    vectors, labels = clusters([6, 7, 8, 9], spread=2.5, seed=5)
    r = evaluate_vectors(vectors, labels, [1, 3, 10], seed=1)
    conf = np.array(r["knn"]["confusion"])
    assert conf.sum() == 30 and conf.sum(1).tolist() == [6, 7, 8, 9]
    assert np.trace(conf) / 30 == pytest.approx(r["knn"]["accuracy"]["10"])
    for k in ("1", "3", "10"):   # overall = image-weighted mean of the per-class numbers
        mean = sum(c["precision_at_k"][k] * c["images"] for c in r["per_class"].values()) / 30
        assert mean == pytest.approx(r["retrieval"]["precision_at_k"][k])
    mean_ap = sum(c["average_precision"] * c["images"] for c in r["per_class"].values()) / 30
    assert mean_ap == pytest.approx(r["retrieval"]["map"])
    assert np.array(r["linear_probe"]["confusion"]).sum() == r["linear_probe"]["test"]
    assert evaluate_vectors(vectors, labels, [1, 3, 10], seed=1) == r            # seeded: the same numbers again


def test_large_k_is_left_out_with_a_note():
    vectors, labels = clusters([3, 3], seed=0)
    r = evaluate_vectors(vectors, labels, [1, 5, 10], probe=False, unlabelled=2)
    assert r["ks"] == [1, 5] and r["linear_probe"] is None
    assert any("k = 10 left out" in n for n in r["notes"]) and any("2 unlabelled" in n for n in r["notes"])
    # classes of 3: a perfect ranking still scores 2/5 at k = 5, and the note says so
    assert any("precision@5 can reach at most 0.40" in n for n in r["notes"]), r["notes"]
    assert r["retrieval"]["precision_at_k"]["5"] == pytest.approx(0.4)
    with pytest.raises(EvaluationError, match=r"at most 5 each\): ask for k up to 5"):
        evaluate_vectors(vectors, labels, [10, 20], probe=False)   # nothing left to measure


def test_chance_levels():
    assert chance_levels(np.array([2, 3, 5])) == pytest.approx(
        {"retrieval_precision": (2 + 6 + 20) / 90, "majority_class": 0.5, "uniform": 1 / 3})


@pytest.mark.parametrize("labels, match", [
    ([], "no labelled images"),
    (["cats"] * 4, "only the label 'cats'"),
    (["cats", "cats", "dogs"], "single image: 'dogs'"),
    (["caf\udce9"] * 3, r"only the label 'caf\\xe9'\."),   # a name that is not UTF-8, escaped once (it was twice)
])
def test_unevaluable_labels(labels, match):
    with pytest.raises(EvaluationError, match=match):
        check_labels(labels)
    with pytest.raises(ValueError, match=match):
        evaluate_vectors(np.zeros((len(labels), 4), np.float32), labels)


def test_a_folder_of_one_image_is_left_out_with_a_note_not_the_whole_evaluation():
    rng = np.random.default_rng(0)
    labels = ["cats"] * 4 + ["my holiday"] + ["owls"] * 4
    vectors = rng.normal(size=(9, 8)).astype(np.float32)
    r = evaluate_vectors(vectors, labels, [1, 3])
    assert r["labels"] == ["cats", "owls"] and r["images"]["labelled"] == 8 and r["evaluated_images"] == 8
    assert r["images"]["single_image_labels"] == 1
    assert any("single image left out" in note and "'my holiday'" in note for note in r["notes"]), r["notes"]
    without = evaluate_vectors(np.delete(vectors, 4, axis=0), labels[:4] + labels[5:], [1, 3])
    assert r["retrieval"] == without["retrieval"] and r["linear_probe"]["accuracy"] == without["linear_probe"]["accuracy"]


def test_sample_index_is_clearly_above_chance(sample_index):
    r = evaluate_index(sample_index.index_dir, [1, 5], seed=0)
    assert r["index"]["model"] == "alexnet" and r["images"] == {"labelled": 30, "unlabelled": 0, "classes": 5, "single_image_labels": 0}
    chance = r["chance"]
    assert chance["retrieval_precision"] == pytest.approx(5 / 29) and chance["majority_class"] == 0.2
    assert r["retrieval"]["precision_at_k"]["1"] >= 0.8 and r["retrieval"]["precision_at_k"]["5"] >= 0.6
    assert r["retrieval"]["map"] >= 2 * chance["retrieval_precision"]
    assert r["knn"]["accuracy"]["1"] >= 0.8 and r["knn"]["accuracy"]["5"] >= 0.6
    assert r["linear_probe"]["accuracy"] >= 0.6


def test_unlabelled_images_are_left_out(tmp_path, index_images):
    data = tmp_path / "data"
    make_sample_collection(data, per_class=3, size=(64, 48), seed=0, classes=["red_circles", "blue_squares"])
    for i in range(2):
        Image.new("RGB", (64, 48), (i * 100, 50, 50)).save(data / f"loose{i}.png")
    index_images(data, tmp_path / "index")
    catalog = Catalog(tmp_path / "index")
    try:
        loaded = load_labelled_vectors(catalog)
        assert loaded.unlabelled == 2 and len(loaded.labels) == 6 and loaded.vectors.shape == (6, 4096)
        stored = dict(zip(*next(catalog.vectors(loaded.ids[:1]))))
        np.testing.assert_array_equal(loaded.vectors[0], stored[int(loaded.ids[0])])
    finally:
        catalog.close()
    r = evaluate_index(tmp_path / "index", [1, 3])
    assert r["images"] == {"labelled": 6, "unlabelled": 2, "classes": 2, "single_image_labels": 0}
    assert any("2 unlabelled" in n for n in r["notes"])


def test_missing_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="run index-images first"):
        evaluate_index(tmp_path / "nothing")


def test_some_queries_search_everything_and_score_as_in_the_full_run():
    rng = np.random.default_rng(3)
    codes = np.arange(30) % 3
    labels = [f"c{c}" for c in codes]
    vectors = (rng.normal(size=(30, 8)) + 2 * np.eye(3, 8)[codes]).astype(np.float32)   # 3 loose clusters
    asking = np.zeros(30, dtype=bool)
    asking[::4] = True                                       # 8 queries; the other 22 are only searched
    full = leave_one_out(vectors, codes, [1, 5])
    part = leave_one_out(vectors, codes, [1, 5], queries=np.flatnonzero(asking))
    np.testing.assert_array_equal(part["precision"], full["precision"][:, asking])
    np.testing.assert_array_equal(part["ap"], full["ap"][asking])
    r = evaluate_vectors(vectors, labels, [1, 5], queries=asking)
    assert r["evaluated_images"] == 8 and sum(c["images"] for c in r["per_class"].values()) == 8
    assert r["retrieval"]["map"] == pytest.approx(full["ap"][asking].mean())
    assert (r["linear_probe"]["split"], r["linear_probe"]["train"], r["linear_probe"]["test"]) == ("held_out", 22, 8)
    asked = Counter(label for label, q in zip(labels, asking) if q)
    assert r["chance"]["retrieval_precision"] == pytest.approx(sum(asked[c] * 9 for c in asked) / (8 * 29))


def test_a_class_added_after_fine_tuning_lends_the_probe_half_its_images_instead_of_scoring_zero():
    """Reproduces: a class folder added after fine-tuning has every image held out, so the probe (trained on the
    fine-tuning images) had never seen it: probe accuracy 0.000 for it, 0.556 overall against kNN 1.000."""
    rng = np.random.default_rng(1)
    codes = np.repeat(np.arange(3), 10)                         # c2 is the new class: no image outside the queries
    labels = [f"c{c}" for c in codes]
    vectors = (0.3 * rng.normal(size=(30, 8)) + 3 * np.eye(3, 8)[codes]).astype(np.float32)   # 3 tight clusters
    asking = (np.arange(30) % 10 >= 7) | (codes == 2)           # 3 held-out images of c0 and c1, all 10 of c2
    r = evaluate_vectors(vectors, labels, [1, 5], queries=asking)
    assert r["evaluated_images"] == 16 and r["per_class"]["c2"]["images"] == 10   # the kNN numbers: all the queries
    probe = r["linear_probe"]
    assert (probe["train"], probe["test"]) == (14 + 5, 16 - 5)   # half of c2 trains the probe
    assert probe["accuracy"] == 1.0 and r["per_class"]["c2"]["probe_accuracy"] == 1.0
    assert any("no training image of 1 label(s)" in note and "'c2'" in note for note in r["notes"])


def test_classes_too_small_for_the_largest_k_are_named():
    """Reproduces: a class of 2 images showed kNN@10 0.000 and precision@10 0.100 without a word on why."""
    rng = np.random.default_rng(0)
    labels = ["a"] * 12 + ["b"] * 12 + ["two"] * 2 + ["three"] * 3
    r = evaluate_vectors(rng.normal(size=(29, 8)).astype(np.float32), labels, [1, 5, 10])
    assert ("2 label(s) with 5 images or fewer: their kNN@10 vote is hard to win (at most 2 of the 10 neighbours can "
            "be of their class) and their precision@10 is capped: 'two' (2), 'three' (3)") in r["notes"]
    roomy = evaluate_vectors(rng.normal(size=(29, 8)).astype(np.float32), labels, [1, 5])
    assert [note for note in roomy["notes"] if "hard to win" in note] == [   # k=5: 3 images can win the vote
        "1 label(s) with 2 images or fewer: their kNN@5 vote is hard to win (at most 1 of the 5 neighbours can be of "
        "their class) and their precision@5 is capped: 'two' (2)"]


def test_a_single_image_class_that_never_queries_is_only_searched():
    rng = np.random.default_rng(0)
    labels = ["a"] * 5 + ["b"] * 5 + ["lonely"]
    asking = np.array([True] * 10 + [False])
    r = evaluate_vectors(rng.normal(size=(11, 4)).astype(np.float32), labels, [1], queries=asking)
    assert set(r["per_class"]) == {"a", "b"} and r["labels"] == ["a", "b", "lonely"]
    everyone = evaluate_vectors(rng.normal(size=(11, 4)).astype(np.float32), labels, [1])   # it would query: left out
    assert everyone["labels"] == ["a", "b"] and "'lonely'" in everyone["notes"][-1]


def test_query_scores_rank_held_out_queries_among_the_base():
    # 1-d: class 0 at 0 and 1, class 1 at 2 and 3. The query at 0.4 (class 0) ranks 0, 1, 2, 3: AP 1, its nearest is
    # class 0. The query at 1.6 (class 0) ranks 2 (class 1), 1, 3, 0: relevant at ranks 2 and 4, AP (1/2 + 2/4) / 2.
    base = np.array([[0.0], [1.0], [2.0], [3.0]], dtype=np.float32)
    queries = np.array([[0.4], [1.6]], dtype=np.float32)
    scores = query_scores(queries, np.array([0, 0]), base, np.array([0, 0, 1, 1]), k=1)
    assert scores == {"knn_accuracy": 0.5, "map": pytest.approx(0.75), "k": 1, "queries": 2}
    # k=3: the query at 1.6 sees classes 1, 0, 1: outvoted again; at 0.4: 0, 0, 1
    assert query_scores(queries, np.array([0, 0]), base, np.array([0, 0, 1, 1]), k=3)["knn_accuracy"] == 0.5
    # a query that is not in the base: its own copy is not there to find
    far = query_scores(np.array([[2.9]], np.float32), np.array([1]), base, np.array([0, 0, 1, 1]), k=2)
    assert far["knn_accuracy"] == 1.0 and far["map"] == pytest.approx(1.0)


def test_a_whitened_index_is_evaluated_as_it_is_searched(tmp_path, index_images):
    """Reproduces: evaluate-index scored the raw fc7 vectors of a whitened index (precision@10 0.908) where its own
    searches gave 0.925: the numbers were not those of the searches a user makes."""
    from retrieval.search.index import ImageIndex

    data = tmp_path / "data"
    make_sample_collection(data, per_class=26, size=(48, 36), seed=2)     # 130 images: whitened (auto, 32-d)
    index_images(data, tmp_path / "index")
    result = evaluate_index(tmp_path / "index", ks=(1, 5), probe=False)
    assert result["index"]["whitened_dim"] == 32 and result["index"]["vector_index"] == "PCAW32,L2norm,Flat"

    index = ImageIndex(tmp_path / "index", load_network=False)   # what searches give: each image's own search
    try:
        snapshot = index.snapshot()
        ids, vectors = map(np.concatenate, zip(*snapshot.catalog.vectors()))
        labels = {r.id: r.label for r in snapshot.catalog.list_images(limit=10_000)}
        hits = snapshot.search_vectors(vectors, 5, exclude=[{int(i)} for i in ids])
    finally:
        index.close()
    searched = {k: np.mean([sum(labels[h.id] == labels[int(i)] for h in found[:k]) / k for i, found in zip(ids, hits)])
                for k in (1, 5)}
    for k in (1, 5):
        assert result["retrieval"]["precision_at_k"][str(k)] == pytest.approx(searched[k], abs=1e-9), k
