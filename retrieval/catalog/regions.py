"""Regional vectors (index-images --regions; a Catalog mixin): a table of their own, made by the first run that writes
them, read in chunks, checked against their checksums, deleted with their images."""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
from sqlalchemy import delete, func, inspect, select

from retrieval.catalog.schema import RegionBase, RegionRow, stack_vector_rows, vector_checksum


class RegionVectors:
    """Mixed into Catalog: uses its engine, Session, _intact and _has_regions."""

    def enable_regions(self) -> None:
        """Create the region_vectors table (a new index with regions; nothing happens when it exists)."""
        RegionBase.metadata.create_all(self.engine)
        self._has_regions = True

    def has_regions(self) -> bool:
        """Whether the catalog has a region_vectors table (only indexes made with --regions do)."""
        if not self._has_regions:
            with self.engine.connect() as conn:
                self._has_regions = inspect(conn).has_table(RegionRow.__tablename__)
        return self._has_regions

    def region_count(self) -> int:
        """How many regional vectors the catalog holds."""
        if not self.has_regions():
            return 0
        with self.Session() as s:
            return s.scalar(select(func.count()).select_from(RegionRow)) or 0

    def region_ids(self) -> np.ndarray:
        """The images that have regional vectors, shape=(N,), int64, ascending."""
        if not self.has_regions():
            return np.zeros(0, np.int64)
        with self.Session() as s:
            return np.array(s.scalars(select(RegionRow.image_id).distinct().order_by(RegionRow.image_id)).all(),
                            dtype=np.int64)

    def region_vectors(self, ids: Iterable[int] | None = None,
                       chunk: int = 2048) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (image ids shape=(m,) int64, one per region, vectors shape=(m, dim) float32) in chunks of images, by
        image id then region; all images when ids is None. A region failing its checksum is left out, and its image
        counted among bad_vectors (marked to be extracted again, as a damaged image vector is)."""
        if not self.has_regions():
            return
        columns = (RegionRow.image_id, RegionRow.vector, RegionRow.vector_crc32)
        order = (RegionRow.image_id, RegionRow.region)
        with self.Session() as s:
            wanted = self.region_ids() if ids is None else np.unique(np.asarray(list(ids), dtype=np.int64))
            for start in range(0, len(wanted), chunk):
                part = s.execute(select(*columns).where(RegionRow.image_id.in_(wanted[start:start + chunk].tolist()))
                                 .order_by(*order)).all()
                good = [r for r in part if self._intact(r)]
                if good:
                    yield stack_vector_rows(good)

    def check_region_vectors(self) -> list[int]:
        """Every regional vector against its checksum -> the ids of the images with a damaged one."""
        bad: set[int] = set()
        if not self.has_regions():
            return []
        with self.Session() as s:
            result = s.execute(select(RegionRow.image_id, RegionRow.vector, RegionRow.vector_crc32)
                               .execution_options(yield_per=2048))
            for image_id, blob, crc in result:
                if vector_checksum(blob) != crc:
                    bad.add(int(image_id))
        return sorted(bad)

    @staticmethod
    def _delete_regions(s, ids: list[int], has_regions: bool) -> None:  # noqa: ANN001 - a session in a transaction
        """Delete these images' regional vectors in s's transaction (has_regions: looked up before it began)."""
        if ids and has_regions:
            for start in range(0, len(ids), 500):
                s.execute(delete(RegionRow).where(RegionRow.image_id.in_(ids[start:start + 500])))
