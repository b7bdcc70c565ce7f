"""What find-duplicates answers: the threshold and where it came from, the groups of images with their suggested keeper,
and the order and file identities that choose it (retrieval.search.duplicates makes them)."""
from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from retrieval.catalog.catalog import ImageRecord
from retrieval.images.edits import EDITS
from retrieval.vectors.duplicates import CAUTION_NEIGHBOUR_SHARE, STRICT_NEIGHBOUR_SHARE, ThresholdChoice


@dataclasses.dataclass(frozen=True)
class Threshold:
    """The distance (between whitened vectors) under which two images are near-duplicates, and where it came from."""
    value: float
    source: str                         # "calibrated" or "given"
    choice: ThresholdChoice | None      # the calibration's numbers (None when given)
    calibration_images: int = 0         # images whose copies were made

    def to_json(self) -> dict:
        return {"value": round(self.value, 6), "source": self.source, "calibration_images": self.calibration_images,
                "calibration": None if self.choice is None else self.choice.to_json()}

    def caution(self) -> str | None:
        """A warning when more than CAUTION_NEIGHBOUR_SHARE of the collection's own nearest-neighbour distances fall
        under the calibrated threshold (the calibration counts them as copies; they may be pictures only alike), with
        a stricter threshold to try; else None."""
        c = self.choice
        if c is None or c.neighbour_share <= CAUTION_NEIGHBOUR_SHARE or c.strict_threshold >= c.threshold:
            return None
        said = (f"caution: {c.neighbour_share:.1%} of the distances between these images and their nearest others are "
                "under it, counted as copies. If the collection holds few real copies, groups may join pictures that "
                "are only alike")
        if not self.strict_offered():
            return (f"{said}; no threshold keeps that under {STRICT_NEIGHBOUR_SHARE:.0%} and still finds copies (its "
                    "pictures are as alike as an image and its edited copies): look at the groups before acting on them.")
        return (f"{said}; threshold {c.strict_threshold:.3f} keeps that under {STRICT_NEIGHBOUR_SHARE:.0%} "
                f"and still finds {c.strict_copy_recall:.0%} of the copies.")

    def strict_offered(self) -> bool:
        """Whether the caution offers its stricter threshold: one that still finds a useful share of the copies (at
        0.012, finding 0% of them, it was advice to find nothing)."""
        return self.choice is not None and self.choice.strict_copy_recall >= STRICT_MIN_COPY_RECALL

    def describe(self, *, override: bool = True) -> str:
        """The threshold in words: how it was calibrated; override: and how to give another (the command line's and
        Python's way; the page offers its own)."""
        if self.choice is None:
            return f"threshold {self.value:.3f} (given)"
        c = self.choice
        return (f"threshold {self.value:.3f}, calibrated on this collection. {c.copy_recall:.0%} of {c.copies} edited "
                f"copies of {self.calibration_images} of its images ({', '.join(EDITS)}) lie within it of their "
                f"original. Of {c.neighbours} distances from its images to their nearest others, "
                f"{c.neighbour_share:.1%} fall under it; about {c.copy_rate:.1%} look like copies{self._in_groups()}, "
                "and the threshold was chosen for that." + (" --threshold (from Python: threshold=) overrides it."
                                                             if override else ""))

    def _in_groups(self) -> str:
        g = self.choice.group_size
        return f" (in groups of about {g:.0f}, so copies of one image count with each other too)" if g > 2 else ""


@dataclasses.dataclass(frozen=True)
class DuplicateImage:
    id: int
    path: str
    label: str | None
    width: int
    height: int
    size: int
    mtime_ns: int
    sha256: str
    distance: float          # to the group's keeper, between whitened vectors (0 for the keeper and its byte copies)
    link_to: str | None = None   # the path of an earlier member whose file this is too (a symlink or hard link to
                                 # it: removing this name frees nothing); None: a file of its own


def byte_twin(group: list[DuplicateImage], i: int) -> DuplicateImage | None:
    """The earlier member of group whose bytes member i's are, where that is not the keeper (whose byte copies are
    marked "same") and member i is no link (marked "link"): certain too, where a review saw two 0.250s under a
    keeper. None otherwise. For find-duplicates' text and /duplicates alike."""
    m = group[i]
    if i == 0 or m.link_to or m.sha256 == group[0].sha256:
        return None
    return next((o for o in group[1:i] if o.sha256 == m.sha256 and not o.link_to), None)


@dataclasses.dataclass(frozen=True)
class DuplicateGroups:
    """Groups of near-duplicate images, each with its suggested keeper first."""
    groups: list[list[DuplicateImage]]
    threshold: Threshold
    images: int              # images looked at
    whitened: bool = True    # distances between whitened vectors; False: raw unit vectors (too few images to whiten)
    random_weights: bool = False   # the index's network has seeded random weights
    data_dir: Path | None = None   # the folder the paths are relative to

    def __iter__(self) -> Iterator[list[DuplicateImage]]:   # for group in index.duplicates(): (no __len__: an
        return iter(self.groups)                            # empty result stays truthy where callers test for None)

    def notes(self) -> list[str]:
        """What to bear in mind reading these groups (find-duplicates prints them, /duplicates shows them): with
        random weights, groups of pictures that are alike, not copies (make demo's drawings: 40 of 60 grouped)."""
        return [RANDOM_WEIGHTS_GROUPS] if self.random_weights and alike_groups(self) else []

    def __str__(self) -> str:
        shown = "\n".join(f"  {len(g)}: " + ", ".join(m.path for m in g[:4]) + (" ..." if len(g) > 4 else "")
                          for g in self.groups[:10])
        more = f"\n  ... {len(self.groups) - 10} more" if len(self.groups) > 10 else ""
        notes = "".join(f"\nnote: {note}" for note in self.notes())
        return (f"{len(self.groups)} group(s) of near-duplicates among {self.images} images "
                f"(threshold {self.threshold.value:.3f}; keeper first){':' if shown else ''}\n{shown}{more}{notes}").rstrip()

    def to_json(self) -> dict:
        """Plain data for json.dumps (find-duplicates --json): paths relative to data_dir, and each file's whole
        path ("file"), so a script run elsewhere can act on them."""
        return {"groups": [[{"id": m.id, "path": m.path, "label": m.label, "width": m.width, "height": m.height,
                             "bytes": m.size, "sha256": m.sha256,   # the keeper's sha256 again: a byte copy
                             "distance": round(m.distance, 6), "link_to": m.link_to,
                             "file": None if self.data_dir is None else str(self.data_dir / m.path)} for m in g]
                           for g in self.groups],
                "threshold": self.threshold.to_json(), "images": self.images,
                "data_dir": None if self.data_dir is None else str(self.data_dir)}


STRICT_MIN_COPY_RECALL = 0.1   # a stricter threshold finding fewer of the calibration's copies is not offered


def keeper_order(record: ImageRecord) -> tuple:
    """Sort key putting the image to keep first: the largest (pixels, then bytes), then the oldest, then the shortest
    name ("photo.jpg" before "photo copy.jpg" and "photo (1).jpg", which sort before it), then by path."""
    return (-record.width * record.height, -record.size, record.mtime_ns, len(record.path.rsplit("/", 1)[-1]),
            record.path)


def file_identities(data_dir: Path, records: list[ImageRecord]) -> dict[str, tuple[bool, tuple[int, int] | None]]:
    """path -> (whether it is a symlink, the (device, inode) of the file it names; None when it cannot be looked at),
    for records sharing their content with another: two names of one file are no copies (deleting the symlink's
    target as a "duplicate" would leave the link dangling)."""
    shared = Counter(r.sha256 for r in records)
    identities = {}
    for r in records:
        if shared[r.sha256] < 2:
            continue
        path = data_dir / r.path
        try:
            st = path.stat()
            identities[r.path] = (path.is_symlink(), (st.st_dev, st.st_ino))
        except OSError:
            identities[r.path] = (False, None)
    return identities


def alike_groups(result: DuplicateGroups) -> bool:
    """Whether a group holds more than byte copies of its keeper (only those can be alike pictures, not copies)."""
    return any(m.sha256 != group[0].sha256 for group in result.groups for m in group[1:])


RANDOM_WEIGHTS_GROUPS = ("this index's network has seeded random weights: pictures alike in colour, shape and texture "
                         "lie as close as copies do, so some groups may be of alike pictures, not copies")
