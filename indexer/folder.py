"""indexer.index_folder: index-images as one Python call, for notebooks and scripts."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from indexer.config import JobConfig, RunReport

# JobConfig fields index_folder sets itself; every other field is an option (layer, seed, device, batch_size, ...)
_OWN = {"data_dir", "index_dir", "model", "weights", "progress", "on_progress"}


def index_folder(data_dir: str | os.PathLike, index_dir: str | os.PathLike = "index", *,
                 weights: str | os.PathLike | None = None, model: str | None = None,
                 progress: Callable[[int, int], None] | None = None, progress_bar: bool = False, **options: Any) -> RunReport:
    """Index the images under data_dir into index_dir (made if missing), as `index-images` does; -> the run's report.

    data_dir, index_dir: relative to the working folder or absolute. Images in subfolders are labelled by
    their folder (data/<class>/<image>). Re-running is incremental: unchanged files are not read again.
    weights: "imagenet" (torchvision's, cached or downloaded), "random" (seeded, saved in the index; for
    demos and tests), or a state dict file (e.g. from fine-tuning); model: "alexnet" or "vgg16". Both
    default to the index's own for an existing index, else imagenet and alexnet.
    progress: progress(done, total) after each committed batch: files done (indexed or skipped) of this
    run's total; called on the writer thread, not when there is nothing to index; an exception it raises
    stops the run. progress_bar: tqdm's bar on a terminal, as index-images shows.
    options: the other JobConfig settings (layer, seed, device, batch_size, workers, db_url, normalize,
    max_pixels, vector_index, ...). Raises ConfigError for settings the index or the folder refuse
    (another network than the index's, a missing folder), TypeError for an unknown option.
    """
    from indexer.run import run_index

    known = {f.name for f in dataclasses.fields(JobConfig)} - _OWN
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"index_folder() got unknown option(s) {', '.join(unknown)}; "
                        f"the options are {', '.join(sorted(known))}")
    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)
    cfg = JobConfig(data_dir=Path(data_dir), index_dir=Path(index_dir), model=model, weights=weights,
                    progress=progress_bar, on_progress=progress, **options)
    return run_index(cfg)
