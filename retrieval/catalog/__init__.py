"""The catalog: image rows with their vectors, the index settings and runs, in SQLite or PostgreSQL through SQLAlchemy.

db.py: URLs, engines, locks, passwords masked; schema.py: the ORM rows; catalog.py: the repository (Catalog), with
integrity.py (checksums, quick_check, the FAISS digest), records.py (one-row JSON records), file_states.py
(the files' recorded states) and vector_rows.py (vectors read back under their checksums) mixed in; values.py:
what callers see (IndexSettings, ImageRecord).
"""
from retrieval.catalog.catalog import Catalog
from retrieval.catalog.values import ImageRecord, IndexSettings, weights_label
from retrieval.catalog.db import (CATALOG_FILE, CatalogBusy, CatalogUnavailable, catalog_sqlite_file, damaged_message,
                                  damaged_reason, database_full_message, db_error_reason,
                                  make_engine, mask_url)
from retrieval.catalog.schema import blob_to_vector, vector_to_blob

__all__ = ["CATALOG_FILE", "Catalog", "CatalogBusy", "CatalogUnavailable", "ImageRecord", "IndexSettings",
           "blob_to_vector", "catalog_sqlite_file", "damaged_message", "damaged_reason", "database_full_message", "db_error_reason", "make_engine", "mask_url", "vector_to_blob",
           "weights_label"]
