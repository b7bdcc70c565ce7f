"""What callers see of the catalog's rows: an index's settings (IndexSettings, weights_label) and an image's
record without its vector (ImageRecord)."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from retrieval.catalog.schema import ImageRow
from retrieval.features.weights import WeightsChoice
from retrieval.images.decode import Preprocessing


@dataclasses.dataclass(frozen=True)
class IndexSettings:
    model: str
    layer: str
    weights: str               # "imagenet", "random" or a file's absolute path: str(WeightsChoice), as stored
    weights_identity: str
    seed: int
    dim: int
    normalize: bool
    preprocessing: str
    data_dir: str
    views: str = "single"      # the descriptor of the image alone, or averaged over views: "flip", "flip+scales"

    @classmethod
    def from_row(cls, values: Mapping[str, Any]) -> "IndexSettings":
        """From the index_settings row's columns by name; views NULL or absent: an index made before views."""
        return cls(**{**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values},
                      "views": values.get("views") or "single"})

    @property
    def weights_sha256(self) -> str | None:
        """The SHA-256 of the weights file the index records (random weights or a state dict file); None for
        ImageNet's, known by their name."""
        sha256 = self.weights_identity.rpartition("sha256=")[2]
        return sha256 if "sha256=" in self.weights_identity else None

    @property
    def weights_choice(self) -> WeightsChoice:
        """weights as the typed choice (weights itself is the text the catalog keeps)."""
        return WeightsChoice.parse(self.weights)

    @property
    def input_norm(self) -> str:
        """How the network's input is normalised: "weights" or "image" (kept in the preprocessing record)."""
        return Preprocessing.from_record(self.preprocessing).input_norm

    @property
    def regions(self) -> int:
        """How many regional vectors each image has besides its own (index-images --regions; 0: none), kept in the
        preprocessing record."""
        return Preprocessing.from_record(self.preprocessing).regions


def weights_label(settings: IndexSettings) -> str:
    """The weights as shown to anyone: "imagenet", "random", or a file's name and short hash, never its path."""
    choice = settings.weights_choice
    if not choice.is_file:
        return str(choice)
    digest = settings.weights_identity.rpartition("sha256=")[2][:12]
    return f"{choice.path.name} (sha256 {digest})" if digest else choice.path.name


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """What callers see of an image row (no vector)."""
    id: int
    path: str
    label: str | None
    size: int
    mtime_ns: int
    width: int
    height: int
    sha256: str


def image_record(row: ImageRow) -> ImageRecord:
    return ImageRecord(row.id, row.path, row.label, row.size, row.mtime_ns, row.width, row.height, row.sha256)
