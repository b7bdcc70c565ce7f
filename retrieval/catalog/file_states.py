"""The state of each indexed or skipped file as the catalog records it (a Catalog mixin): what index-images' plan
compares the folder with, and the new times it records for files whose bytes did not change."""
from __future__ import annotations

from typing import Iterable

from sqlalchemy import delete, func, select, update

from retrieval.catalog.schema import ImageRow, SkippedRow


class FileStates:
    """Mixed into Catalog: uses its Session."""

    def file_states(self) -> dict[str, tuple[int, int, int]]:
        """path -> (id, size, mtime_ns) for every indexed image."""
        with self.Session() as s:
            return {p: (i, sz, mt) for i, p, sz, mt in s.execute(select(ImageRow.id, ImageRow.path, ImageRow.size, ImageRow.mtime_ns))}

    def hash_prefixes(self) -> dict[int, str]:
        """id -> the first 16 hex digits of its sha256, for every indexed image (what a thumbnail's name holds)."""
        with self.Session() as s:
            return dict(s.execute(select(ImageRow.id, func.substr(ImageRow.sha256, 1, 16))).all())

    def recorded_contents(self, paths: Iterable[str]) -> dict[str, tuple[int, int, str]]:
        """path -> (size, mtime_ns, sha256) of those of paths that are indexed."""
        paths, found = list(paths), {}
        with self.Session() as s:
            for start in range(0, len(paths), 500):   # a bounded IN list per query
                found.update((p, (size, mtime, sha)) for p, size, mtime, sha in s.execute(
                    select(ImageRow.path, ImageRow.size, ImageRow.mtime_ns, ImageRow.sha256)
                    .where(ImageRow.path.in_(paths[start:start + 500]))))
        return found

    def restamp(self, stamps: Iterable[tuple[str, int, int]]) -> int:
        """Record a new (size, mtime_ns) for indexed files whose content is as indexed (a touch, a copy that did not
        keep the times): their ids, vectors and everything else stay. stamps: (path, size, mtime_ns). -> rows updated.
        Not a change of the images: the index's updated_at stays."""
        stamps = list(stamps)
        if not stamps:
            return 0
        with self.Session.begin() as s:
            return sum(s.execute(update(ImageRow).where(ImageRow.path == path).values(size=size, mtime_ns=mtime))
                       .rowcount for path, size, mtime in stamps)

    def move(self, moves: Iterable[tuple[str, str, str | None]]) -> int:
        """Give indexed images their new path and label (moved or renamed in the data folder, the same bytes): their
        ids and vectors stay. moves: (old path, new path, new label). -> rows updated. A change of the index (labels):
        its updated_at moves."""
        moves = list(moves)
        if not moves:
            return 0
        with self.Session.begin() as s:
            # a new path that was a skipped file (a bad file replaced by a moved good one) is skipped no more
            s.execute(delete(SkippedRow).where(SkippedRow.path.in_([new for _old, new, _label in moves])))
            moved = sum(s.execute(update(ImageRow).where(ImageRow.path == old).values(path=new, label=label)).rowcount
                        for old, new, label in moves)
        self.touch()
        return moved

    def skipped_states(self) -> dict[str, tuple[int, int, str]]:
        """path -> (size, mtime_ns, reason) for every skipped file."""
        with self.Session() as s:
            return {r.path: (r.size, r.mtime_ns, r.reason) for r in s.scalars(select(SkippedRow))}
