"""The Python API's evaluation: evaluate(index) and compare(a, b) as dataclasses that show themselves as HTML tables."""
from __future__ import annotations

import dataclasses
import html
import numbers
import os
from collections.abc import Sequence
from pathlib import Path

from retrieval.names import DEFAULT_KS


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """How well an index's stored features separate its labelled classes (leave-one-out), against chance."""
    index: dict                          # the index and its network: dir, model, layer, weights_label, dim, ...
    images: int                          # labelled images evaluated (the queries)
    classes: int
    ks: list[int]                        # neighbour counts evaluated
    precision_at_k: dict[int, float]     # retrieval: share of the k nearest with the query's label, mean over queries
    map: float                           # mean average precision over the whole ranking
    knn_accuracy: dict[int, float]       # leave-one-out kNN majority vote, by k
    probe_accuracy: float | None         # a linear probe's test accuracy (None: not run)
    chance: dict[str, float]             # retrieval_precision, majority_class, uniform
    notes: list[str]
    excluded_training_images: int        # labelled images left out because the network was fine-tuned on them
    training_images: str                 # "excluded", "included" (asked for), "unknown" (not recorded), "none"
    result: dict = dataclasses.field(repr=False)   # evaluate_index's whole JSON-ready result (per class, confusion)

    @classmethod
    def from_result(cls, r: dict) -> Evaluation:
        probe = r["linear_probe"]
        return cls(r["index"], r["evaluated_images"], r["images"]["classes"], list(r["ks"]),
                   {int(k): v for k, v in r["retrieval"]["precision_at_k"].items()}, r["retrieval"]["map"],
                   {int(k): v for k, v in r["knn"]["accuracy"].items()}, None if probe is None else probe["accuracy"],
                   dict(r["chance"]), list(r["notes"]), r["excluded_training_images"], r["training_images"]["status"], r)

    @property
    def evaluated_on(self) -> str:
        """Which images the numbers are of, in words: held out, or with the training images (and why)."""
        return held_out_words(self.result)

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

    def __str__(self) -> str:
        """print(evaluation): the table the notebook shows, as text (it printed the whole dataclass)."""
        width = max(len(name) for name, _, _ in self.rows())
        lines = [f"{network_text(self.index)}: {self.evaluated_on} in {self.classes} classes",
                 f"{'':<{width}}  {'value':>7}  {'chance':>7}"]
        lines += [f"{name:<{width}}  {_text_num(v):>7}  {_text_num(c):>7}" for name, v, c in self.rows()]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def _repr_html_(self) -> str:
        body = "".join(f"<tr><td>{html.escape(name)}</td>{_num(v)}{_num(c)}</tr>" for name, v, c in self.rows())
        return (f"<p>{html.escape(network_text(self.index))}: {html.escape(self.evaluated_on)} in {self.classes} "
                f"classes</p><table><tr><th></th><th>value</th><th>chance</th></tr>{body}</table>{_notes(self.notes)}")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Two indexes evaluated on the labelled images they share (same path, label and content), side by side."""
    a: Evaluation
    b: Evaluation
    matched: dict      # images, only_a, only_b, differing, by, evaluated_images, excluded_training_images, notes

    @property
    def evaluated_on(self) -> str:
        """Which images both sides are evaluated on, in words (see Evaluation.evaluated_on)."""
        return held_out_words({"a": self.a.result, "b": self.b.result, "matched": self.matched})

    def __str__(self) -> str:
        """print(comparison): the side-by-side table the notebook shows, as text."""
        width = max(len(name) for name, _, _ in self.a.rows())
        m = self.matched
        lines = [f"A: {network_text(self.a.index)}", f"B: {network_text(self.b.index)}",
                 f"{m['images']} labelled images in both ({m['only_a']} only in A, {m['only_b']} only in B); both "
                 f"evaluated on {self.evaluated_on}",
                 f"{'':<{width}}  {'A':>7}  {'B':>7}  {'B - A':>7}  {'chance':>7}"]
        lines += [f"{name:<{width}}  {_text_num(va):>7}  {_text_num(vb):>7}  "
                  f"{_text_num(None if va is None or vb is None else vb - va, signed=True):>7}  {_text_num(c):>7}"
                  for (name, va, c), (_, vb, _) in zip(self.a.rows(), self.b.rows())]
        notes = list(m.get("notes", [])) + [f"A: {n}" for n in self.a.notes] + [f"B: {n}" for n in self.b.notes]
        return "\n".join(lines + [f"note: {n}" for n in notes])

    def _repr_html_(self) -> str:
        body = "".join(
            f"<tr><td>{html.escape(name)}</td>{_num(va)}{_num(vb)}"
            f"{_num(None if va is None or vb is None else vb - va, signed=True)}{_num(c)}</tr>"
            for (name, va, c), (_, vb, _) in zip(self.a.rows(), self.b.rows()))
        m = self.matched
        return (f"<p>A: {html.escape(network_text(self.a.index))}<br>B: {html.escape(network_text(self.b.index))}<br>"
                f"{m['images']} labelled images in both ({m['only_a']} only in A, {m['only_b']} only in B); both "
                f"evaluated on {html.escape(self.evaluated_on)}</p>"
                f"<table><tr><th></th><th>A</th><th>B</th><th>B &minus; A</th><th>chance</th></tr>{body}</table>"
                f"{_notes(list(m.get('notes', [])) + [f'A: {n}' for n in self.a.notes] + [f'B: {n}' for n in self.b.notes])}")


def evaluate(index_dir: str | os.PathLike = "index", ks: Sequence[int] = DEFAULT_KS, *, seed: int = 0,
             probe: bool = True, db_url: str | None = None, include_training_images: bool = False) -> Evaluation:
    """Evaluate an index's stored features on its labelled images (no forward pass): leave-one-out retrieval
    precision@k and mAP, kNN accuracy, a linear probe, and the chance levels to read them against.

    The images the index's network was fine-tuned on (recorded by content hash when the index was made with
    fine-tune's weights) are left out of the queries unless include_training_images; see
    Evaluation.excluded_training_images and .training_images. Raises IndexNotFound (a FileNotFoundError: no index there),
    EvaluationError (a ValueError: fewer than two labels, a label with one image, no held-out image)."""
    from retrieval.learning.evaluation import evaluate_index

    _checked_options(seed, probe)
    return Evaluation.from_result(evaluate_index(absolute_index_dir(index_dir), _checked_ks(ks), seed=seed, probe=probe,
                                                 db_url=db_url, include_training_images=include_training_images))


def _checked_ks(ks: Sequence[int] | int) -> tuple[int, ...]:
    """ks as whole numbers from 1 up (one number alone is taken for a list of one). Raises EvaluationError."""
    from retrieval.learning.metrics import EvaluationError

    values = (ks,) if isinstance(ks, numbers.Integral) and not isinstance(ks, bool) else ks
    try:
        values = tuple(values)
    except TypeError:
        raise EvaluationError(f"ks is a list of whole numbers from 1 up, such as (1, 5, 10), not {ks!r}") from None
    if not values or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 for k in values):
        raise EvaluationError(f"ks is a list of whole numbers from 1 up, such as (1, 5, 10), not {ks!r}")
    return tuple(int(k) for k in values)


def compare(a: str | os.PathLike, b: str | os.PathLike, ks: Sequence[int] = DEFAULT_KS, *, seed: int = 0,
            probe: bool = True, include_training_images: bool = False) -> Comparison:
    """Evaluate two indexes of the same labelled images (e.g. ImageNet or random weights as A, fine-tuned as B)
    on the images they share, with the same queries (neither network's training images, unless
    include_training_images) and the same probe split. Raises as evaluate(), and EvaluationError when they
    share no labelled image."""
    from retrieval.learning.evaluation import compare_indexes

    _checked_options(seed, probe)
    r = compare_indexes(absolute_index_dir(a), absolute_index_dir(b), _checked_ks(ks), seed=seed, probe=probe,
                        include_training_images=include_training_images)
    return Comparison(Evaluation.from_result(r["a"]), Evaluation.from_result(r["b"]), r["matched"])


TELLING = ("included", "unknown", "excluded", "none")   # which side of a comparison says most of its training images


def telling_side(result: dict) -> dict:
    """An evaluate_index result itself; of a compare_indexes result, the side whose training images say the most
    (included, else unknown, else excluded): both sides are evaluated on the same images."""
    if "matched" not in result:
        return result
    return min((result["a"], result["b"]), key=lambda r: TELLING.index(r["training_images"]["status"]))


def held_out_words(result: dict) -> str:
    """Which images an evaluate_index or compare_indexes result is of, in words: "8 held-out images (19 training
    images left out)", "27 labelled images, training images included (19 of them trained on)", ..."""
    result = telling_side(result)
    n, excluded = result["evaluated_images"], result.get("excluded_training_images", 0)
    facts = result.get("training_images") or {"status": "none"}
    if facts["status"] == "included":
        return f"{n} labelled images, training images included ({facts['in_index']} of them trained on)"
    if excluded:
        return f"{n} held-out images ({excluded} training images left out)"
    if facts["status"] == "unknown":
        return f"{n} labelled images (which ones the network was fine-tuned on cannot be told apart)"
    if facts["status"] == "excluded":
        return f"{n} held-out images (none of them trained on)"
    return f"{n} labelled images (the network was not fine-tuned on them)"


def network_text(about: dict) -> str:
    """"index (alexnet fc7, weights random, 4096-d)" for an evaluation's "index" entry ("alexnet conv5-gem with flip
    views, ..." for a descriptor averaged over views)."""
    views = about.get("views", "single")
    norm = ", input normalised per image" if about.get("input_norm") == "image" else ""
    return (f"{about['dir']} ({about['model']} {about['layer']}{'' if views == 'single' else f' with {views} views'}{norm}, "
            f"weights {about.get('weights_label', about['weights'])}, {about['dim']}-d)")


def absolute_index_dir(path: str | os.PathLike) -> Path:
    """An index folder given as a path (relative to the working folder or absolute) -> absolute. Raises TypeError
    naming what was given for anything else (None: pathlib's own message named no argument)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"an index folder is a path (str or Path), not {path!r}")
    return Path(path).expanduser().resolve()


def _checked_options(seed: object, probe: object) -> None:
    """seed a whole number, probe True or False; raises EvaluationError naming the one that is not."""
    from retrieval.learning.metrics import EvaluationError

    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise EvaluationError(f"seed is a whole number from 0 to 2**32 - 1, not {seed!r}")
    if not isinstance(probe, bool):
        raise EvaluationError(f"probe is True or False, not {probe!r}")


def _text_num(v: float | None, signed: bool = False) -> str:
    return "-" if v is None else (f"{v:+.3f}" if signed else f"{v:.3f}")


def _num(v: float | None, signed: bool = False) -> str:
    text = "&ndash;" if v is None else _text_num(v, signed)
    return f'<td style="text-align:right">{text}</td>'


def _notes(notes: list[str]) -> str:
    return "".join(f"<p><small>note: {html.escape(n)}</small></p>" for n in notes)
