"""The catalog: image rows with their vectors, the index settings and runs, in SQLite or PostgreSQL through SQLAlchemy.

db.py: URLs, engines, locks, passwords masked; schema.py: the ORM rows; catalog.py: the repository (Catalog).
"""
from retrieval.catalog.catalog import Catalog, ImageRecord, IndexSettings, weights_label
from retrieval.catalog.db import (CATALOG_FILE, CatalogBusy, CatalogUnavailable, catalog_sqlite_file, damaged_message,
                                  damaged_reason, database_full_message, db_error_reason,
                                  make_engine, mask_url)
from retrieval.catalog.schema import blob_to_vector, vector_to_blob

__all__ = ["CATALOG_FILE", "Catalog", "CatalogBusy", "CatalogUnavailable", "ImageRecord", "IndexSettings",
           "blob_to_vector", "catalog_sqlite_file", "damaged_message", "damaged_reason", "database_full_message", "db_error_reason", "make_engine", "mask_url", "vector_to_blob",
           "weights_label"]
