"""The catalog's integrity checks (a Catalog mixin): vectors against their checksums, SQLite's quick_check, the FAISS
file's recorded digest, and images marked to be extracted again."""
from __future__ import annotations

from typing import Iterable

from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from retrieval.catalog.schema import FaissDigestRow, ImageRow, vector_checksum


class IntegrityChecks:
    """Mixed into Catalog: uses its Session, engine, path, index_dir and _vector_rows."""

    def check_vectors(self, chunk: int = 2048) -> dict:
        """Every row's vector against its checksum; rows without one get one (trusted as they are).

        -> {"checked": n, "filled": n, "bad": [ids]}."""
        checked, bad, unsummed = 0, [], []
        for part in self._vector_rows(None, chunk):
            for image_id, blob, crc in part:
                checked += 1
                if crc is None:
                    unsummed.append((image_id, vector_checksum(blob)))
                elif vector_checksum(blob) != crc:
                    bad.append(int(image_id))
        for start in range(0, len(unsummed), 500):
            with self.Session.begin() as s:
                for image_id, crc in unsummed[start:start + 500]:
                    s.execute(ImageRow.__table__.update().where(ImageRow.id == image_id).values(vector_crc32=crc))
        return {"checked": checked, "filled": len(unsummed), "bad": bad}

    def mark_for_extraction(self, ids: Iterable[int]) -> list[str]:
        """Make the next index-images run extract these images again (their recorded size set to -1, which no
        file has). -> their paths."""
        ids = [int(i) for i in ids]
        if not ids:
            return []
        with self.Session.begin() as s:
            paths = list(s.scalars(select(ImageRow.path).where(ImageRow.id.in_(ids)).order_by(ImageRow.path)))
            s.execute(ImageRow.__table__.update().where(ImageRow.id.in_(ids)).values(size=-1))
        return paths

    def quick_check(self) -> list[str]:
        """SQLite's PRAGMA quick_check: [] when the file is sound, else its complaints. [] on a database server."""
        if self.path is None:
            return []
        with self.engine.connect() as conn:
            lines = [str(r[0]) for r in conn.exec_driver_sql("PRAGMA quick_check").all()]
        return [] if lines == ["ok"] else lines

    def _faiss_key(self) -> str:
        """Whose FAISS file a digest is: "." (the one index folder) for SQLite, so a copied folder keeps its
        digest; on a database server, which several index folders share, the folder's absolute path."""
        return "." if self.path is not None else str(self.index_dir.absolute())

    def faiss_digest(self) -> tuple[int, str] | None:
        """(size, digest) of the index folder's FAISS file as last saved, or None (not recorded yet)."""
        try:
            with self.Session() as s:
                row = s.get(FaissDigestRow, self._faiss_key())
        except OperationalError:   # no such table: an older catalog opened read-only
            return None
        return (row.size, row.digest) if row else None

    def save_faiss_digest(self, size: int, digest: str) -> None:
        with self.Session.begin() as s:
            s.merge(FaissDigestRow(index_dir=self._faiss_key(), size=size, digest=digest))
