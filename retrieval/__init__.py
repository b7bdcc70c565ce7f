"""Image retrieval on deep CNN features: search a folder of photos by example, from Python.

Index a folder (one subfolder per class labels its images), then open the index and query it::

    import retrieval
    from indexer import index_folder        # building an index is the indexer's (as `index-images`)

    index_folder("data", "index", weights="random")   # default: ImageNet weights (cached or downloaded)
    with retrieval.open_index("index") as index:
        result = index.search("data/red_circles/red_circles_000.jpg", k=5)   # or bytes, a PIL image, an array
        result                              # in Jupyter: the neighbours' thumbnails, labels and distances
        result[0].label, result[0].distance
        index.neighbours(result[1].id)      # an indexed image's neighbours, from its stored vector
        index.predict("new_photo.jpg").label   # the neighbours' majority vote
        index.duplicates().groups           # near-duplicate groups, a keeper first in each (as find-duplicates)
    retrieval.evaluate("index")             # leave-one-out precision@k, kNN, probe, chance; held-out images
    retrieval.compare("index", "index-tuned")   # two networks on the same labelled images

`open_index` -> `Index` (`search`, `neighbours`, `predict`, `duplicates`, `features`, `len()`, `info`); results are
`SearchResult` (a list of `Hit`), `Prediction`, `IndexInfo`; `evaluate` -> `Evaluation`, `compare` ->
`Comparison`. Errors: `IndexNotFound`, `IndexUnavailable`, `WeightsUnavailable`, `DeviceUnavailable`,
`ImageDecodeError`, `ImageNotIndexed`, `EvaluationError`, `ExpansionError`, `DuplicatesError`, all importable from
here. Importing this package is light: torch loads when
an index is opened.
See docs/python-api.md; the notebook examples/transfer_learning_lab.ipynb walks the whole lesson.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["open_index", "Index", "ImageNotIndexed", "Query", "SearchResult", "Hit", "Prediction", "IndexInfo",
           "evaluate", "compare", "Evaluation", "Comparison", "DuplicateGroups", "DuplicatesError",
           "IndexNotFound", "WeightsUnavailable", "ImageDecodeError", "EvaluationError", "ExpansionError",
           "DeviceUnavailable", "IndexUnavailable"]

# name -> the module that holds it; imported when first used, so `import retrieval` loads no torch, FAISS or SQLAlchemy
_HOMES = {"open_index": "retrieval.python_api", "Index": "retrieval.python_api",
          "ImageNotIndexed": "retrieval.python_api", "Query": "retrieval.python_api",
          "SearchResult": "retrieval.results", "Hit": "retrieval.results", "Prediction": "retrieval.results",
          "IndexInfo": "retrieval.results",
          "evaluate": "retrieval.quality", "compare": "retrieval.quality", "Evaluation": "retrieval.quality",
          "Comparison": "retrieval.quality", "DuplicateGroups": "retrieval.search.duplicates",
          "DuplicatesError": "retrieval.search.duplicates",
          # the errors the API raises, so that `except retrieval.IndexNotFound:` works
          "IndexNotFound": "retrieval.search.index", "WeightsUnavailable": "retrieval.features.weights",
          "ImageDecodeError": "retrieval.images.decode", "EvaluationError": "retrieval.learning.metrics",
          "ExpansionError": "retrieval.search.expansion", "DeviceUnavailable": "retrieval.features.backbones",
          "IndexUnavailable": "retrieval.search.snapshot"}

if TYPE_CHECKING:
    from retrieval.python_api import ImageNotIndexed, Index, Query, open_index
    from retrieval.quality import Comparison, Evaluation, compare, evaluate
    from retrieval.features.weights import WeightsUnavailable
    from retrieval.images.decode import ImageDecodeError
    from retrieval.learning.metrics import EvaluationError
    from retrieval.search.duplicates import DuplicateGroups, DuplicatesError
    from retrieval.search.index import IndexNotFound
    from retrieval.search.expansion import ExpansionError
    from retrieval.features.backbones import DeviceUnavailable
    from retrieval.search.snapshot import IndexUnavailable
    from retrieval.results import Hit, IndexInfo, Prediction, SearchResult


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value   # once: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
