"""The images' vectors read back from the catalog (a Catalog mixin): in chunks or one by one, each checked against its
CRC32, a damaged one left out and logged once (index-images then extracts it again)."""
from __future__ import annotations

import logging
from typing import Iterable, Iterator

import numpy as np
from sqlalchemy import null, select

from retrieval.catalog.schema import ImageRow, blob_to_vector, stack_vector_rows, vector_checksum

log = logging.getLogger("retrieval.catalog.catalog")   # the catalog's own logger, as before this module was split off


class VectorRows:
    """Mixed into Catalog: uses its Session, checksums, bad_vectors, location and file_states."""

    def vectors(self, ids: Iterable[int] | None = None, chunk: int = 2048) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids shape=(n,) int64, vectors shape=(n, dim) float32) in chunks; all rows when ids is None."""
        for part in self._vector_rows(ids, chunk):
            good = [r for r in part if self._intact(r)]
            if good:
                yield stack_vector_rows(good)

    def _vector_rows(self, ids: Iterable[int] | None, chunk: int) -> Iterator[list]:
        """(id, blob, crc32 or None) rows in chunks, by id."""
        columns = (ImageRow.id, ImageRow.vector, self._crc_column())
        with self.Session() as s:
            if ids is None:
                result = s.execute(select(*columns).order_by(ImageRow.id).execution_options(yield_per=chunk))
                for part in result.partitions(chunk):
                    yield part
                return
            ids = sorted(int(i) for i in ids)
            for start in range(0, len(ids), chunk):
                part = s.execute(select(*columns).where(ImageRow.id.in_(ids[start:start + chunk]))
                                 .order_by(ImageRow.id)).all()
                if part:
                    yield part

    def _crc_column(self):  # noqa: ANN202 - a column expression
        return ImageRow.vector_crc32 if self.checksums else null().label("vector_crc32")

    def _intact(self, row) -> bool:  # noqa: ANN001 - (id, blob, crc32)
        """Whether a row's vector matches its checksum (rows without one pass). A bad one is logged once."""
        image_id, blob, crc = row
        if crc is None or vector_checksum(blob) == crc:
            return True
        if image_id not in self.bad_vectors:
            self.bad_vectors.add(image_id)
            log.error("catalog %s: the vector of image %d fails its checksum (damaged); left out of the index. "
                      "index-images --check names the damaged rows and marks them to be extracted again",
                      self.location, image_id)
        return False

    def vectors_by_path(self) -> dict[str, np.ndarray]:
        """Every image's vector by its path (comparing two indexes of the same folder: tests, benchmarks)."""
        paths = {image_id: path for path, (image_id, *_state) in self.file_states().items()}
        return {paths[i]: v for ids, vecs in self.vectors() for i, v in zip(ids.tolist(), vecs)}

    def vector(self, image_id: int) -> np.ndarray | None:
        with self.Session() as s:
            row = s.execute(select(ImageRow.id, ImageRow.vector, self._crc_column())
                            .where(ImageRow.id == int(image_id))).first()
            return None if row is None or not self._intact(row) else blob_to_vector(row[1]).copy()
