"""The weights choice (ImageNet, seeded random, or a state dict file) as one type, torch-free; the weights errors."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

from retrieval.names import random_weights_file

WeightsKind = Literal["imagenet", "random", "file"]


@dataclasses.dataclass(frozen=True)
class WeightsChoice:
    """What --weights names: torchvision's ImageNet weights, seeded random weights (kept in the index folder),
    or a state dict file.

    str(choice) is the text the catalog's settings keep ("imagenet", "random", or the file's path as given:
    an index records the absolute path), and WeightsChoice.parse(str(choice)) == choice.
    """
    kind: WeightsKind
    path: Path | None = None   # the state dict file (kind "file" only)

    def __post_init__(self) -> None:
        assert (self.kind == "file") == (self.path is not None), f"a path goes with kind 'file' only, not {self.kind!r}"

    @classmethod
    def parse(cls, text: str | os.PathLike | WeightsChoice) -> WeightsChoice:
        """"imagenet", "random", or anything else as a file path, "~" expanded (from a variable or a crontab line no
        shell expanded) but not resolved: see resolved()."""
        if isinstance(text, WeightsChoice):
            return text
        if isinstance(text, str) and text in ("imagenet", "random"):
            return cls(text)
        return cls("file", Path(text).expanduser())

    def __str__(self) -> str:
        return os.fspath(self.path) if self.path is not None else self.kind

    @property
    def is_imagenet(self) -> bool:
        return self.kind == "imagenet"

    @property
    def is_random(self) -> bool:
        return self.kind == "random"

    @property
    def is_file(self) -> bool:
        return self.kind == "file"

    def resolved(self) -> WeightsChoice:
        """A file's path made absolute (symlinks resolved), as an index records it; other kinds as they are."""
        return WeightsChoice("file", self.path.resolve()) if self.path is not None else self

    def source_file(self, index_dir: Path, model: str) -> Path | None:
        """The file these weights are loaded and hashed from: the index's random weights or the state dict file
        (None for ImageNet weights, whose identity is their name; their file is in torch hub's cache)."""
        if self.is_random:
            return random_weights_file(index_dir, model)
        return self.path


def file_weights_identity(path: Path, sha256: str) -> str:
    """What an index records of weights from a state dict file: "file:ABSOLUTE_PATH:sha256=HEX"."""
    return f"file:{Path(path).resolve()}:sha256={sha256}"


IMAGENET = WeightsChoice("imagenet")
RANDOM = WeightsChoice("random")


class WeightsUnavailable(RuntimeError):
    """The requested weights cannot be loaded; the message says why, in the library's terms.

    offline_imagenet: the ImageNet weights are neither cached nor downloadable; cache_path is where
    the file would go, so a command line can name its own ways forward.
    """

    def __init__(self, message: str, *, offline_imagenet: bool = False, cache_path: Path | None = None):
        super().__init__(message)
        self.offline_imagenet, self.cache_path = offline_imagenet, cache_path


def weights_error_message(exc: Exception) -> str:
    """A WeightsUnavailable with the ways forward when ImageNet weights are offline, in the command line's terms and
    index_folder's (both raise it)."""
    if not getattr(exc, "offline_imagenet", False):
        return str(exc)
    return (f"{exc}.\nWays forward:\n"
            f"  1. put that file at {exc.cache_path}\n"
            "  2. pass --weights PATH (from Python: weights=PATH) with a state dict file you have for this model\n"
            "  3. pass --weights random (weights=\"random\") to run with seeded random weights (a demo: results show\n"
            "     colour and texture similarity, not what the picture shows)")
