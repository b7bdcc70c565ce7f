"""The Python API's evaluation: evaluate(index) and compare(a, b) as dataclasses that show themselves as HTML tables."""
from __future__ import annotations

import dataclasses
import html
import os
from collections.abc import Sequence
from pathlib import Path

from retrieval.names import DEFAULT_KS


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """How well an index's stored features separate its labelled classes (leave-one-out), against chance."""
    index: dict                          # the index and its network: dir, model, layer, weights_label, dim, ...
    images: int                          # labelled images evaluated
    classes: int
    ks: list[int]                        # neighbour counts evaluated
    precision_at_k: dict[int, float]     # retrieval: share of the k nearest with the query's label, mean over queries
    map: float                           # mean average precision over the whole ranking
    knn_accuracy: dict[int, float]       # leave-one-out kNN majority vote, by k
    probe_accuracy: float | None         # a linear probe's test accuracy (None: not run)
    chance: dict[str, float]             # retrieval_precision, majority_class, uniform
    notes: list[str]
    result: dict = dataclasses.field(repr=False)   # evaluate_index's whole JSON-ready result (per class, confusion)

    @classmethod
    def from_result(cls, r: dict) -> Evaluation:
        probe = r["linear_probe"]
        return cls(r["index"], r["images"]["labelled"], r["images"]["classes"], list(r["ks"]),
                   {int(k): v for k, v in r["retrieval"]["precision_at_k"].items()}, r["retrieval"]["map"],
                   {int(k): v for k, v in r["knn"]["accuracy"].items()}, None if probe is None else probe["accuracy"],
                   dict(r["chance"]), list(r["notes"]), r)

    @property
    def per_class(self) -> dict[str, dict]:
        """label -> {images, precision_at_k, average_precision, knn_accuracy, probe_accuracy}."""
        return self.result["per_class"]

    def rows(self) -> list[tuple[str, float | None, float]]:
        """(measure, value, chance) for each number shown."""
        ch = self.chance
        return ([(f"precision@{k}", v, ch["retrieval_precision"]) for k, v in self.precision_at_k.items()]
                + [("mAP", self.map, ch["retrieval_precision"])]
                + [(f"kNN accuracy, k={k}", v, ch["majority_class"]) for k, v in self.knn_accuracy.items()]
                + [("linear probe accuracy", self.probe_accuracy, ch["majority_class"])])

    def _repr_html_(self) -> str:
        body = "".join(f"<tr><td>{html.escape(name)}</td>{_num(v)}{_num(c)}</tr>" for name, v, c in self.rows())
        return (f"<p>{html.escape(network_text(self.index))}: {self.images} labelled images in {self.classes} classes"
                f"</p><table><tr><th></th><th>value</th><th>chance</th></tr>{body}</table>{_notes(self.notes)}")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Two indexes evaluated on the labelled images they share (same path, label and content), side by side."""
    a: Evaluation
    b: Evaluation
    matched: dict      # images, only_a, only_b, differing, by

    def _repr_html_(self) -> str:
        body = "".join(
            f"<tr><td>{html.escape(name)}</td>{_num(va)}{_num(vb)}"
            f"{_num(None if va is None or vb is None else vb - va, signed=True)}{_num(c)}</tr>"
            for (name, va, c), (_, vb, _) in zip(self.a.rows(), self.b.rows()))
        m = self.matched
        return (f"<p>A: {html.escape(network_text(self.a.index))}<br>B: {html.escape(network_text(self.b.index))}<br>"
                f"{m['images']} labelled images in both ({m['only_a']} only in A, {m['only_b']} only in B)</p>"
                f"<table><tr><th></th><th>A</th><th>B</th><th>B &minus; A</th><th>chance</th></tr>{body}</table>"
                f"{_notes([f'A: {n}' for n in self.a.notes] + [f'B: {n}' for n in self.b.notes])}")


def evaluate(index_dir: str | os.PathLike = "index", ks: Sequence[int] = DEFAULT_KS, *, seed: int = 0,
             probe: bool = True, db_url: str | None = None) -> Evaluation:
    """Evaluate an index's stored features on its labelled images (no forward pass): leave-one-out retrieval
    precision@k and mAP, kNN accuracy, a linear probe (seeded split), and the chance levels to read them against.

    Raises FileNotFoundError (no index there), EvaluationError (a ValueError: fewer than two labels, a label
    with one image)."""
    from retrieval.learning.evaluation import evaluate_index

    return Evaluation.from_result(evaluate_index(_absolute(index_dir), ks, seed=seed, probe=probe, db_url=db_url))


def compare(a: str | os.PathLike, b: str | os.PathLike, ks: Sequence[int] = DEFAULT_KS, *, seed: int = 0,
            probe: bool = True) -> Comparison:
    """Evaluate two indexes of the same labelled images (e.g. ImageNet or random weights as A, fine-tuned as B)
    on the images they share, with the same probe split. Raises as evaluate(), and EvaluationError when they
    share no labelled image."""
    from retrieval.learning.evaluation import compare_indexes

    r = compare_indexes(_absolute(a), _absolute(b), ks, seed=seed, probe=probe)
    return Comparison(Evaluation.from_result(r["a"]), Evaluation.from_result(r["b"]), r["matched"])


def network_text(about: dict) -> str:
    """"index (alexnet fc7, weights random, 4096-d)" for an evaluation's "index" entry ("alexnet conv5-gem with flip
    views, ..." for a descriptor averaged over views)."""
    views = about.get("views", "single")
    return (f"{about['dir']} ({about['model']} {about['layer']}{'' if views == 'single' else f' with {views} views'}, "
            f"weights {about.get('weights_label', about['weights'])}, {about['dim']}-d)")


def _absolute(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _num(v: float | None, signed: bool = False) -> str:
    text = "&ndash;" if v is None else (f"{v:+.3f}" if signed else f"{v:.3f}")
    return f'<td style="text-align:right">{text}</td>'


def _notes(notes: list[str]) -> str:
    return "".join(f"<p><small>note: {html.escape(n)}</small></p>" for n in notes)
