"""SQLite catalogs damaged on purpose: a private copy of an index folder, a table's root page overwritten."""
from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from retrieval.catalog import CATALOG_FILE


def private_copy(index_dir: Path, dest: Path) -> Path:
    """A copy of an index folder with every catalog page in the main file (none left in the WAL), so that damage
    written into the file is what readers see. -> dest."""
    shutil.copytree(index_dir, dest)
    with sqlite3.connect(dest / CATALOG_FILE) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return dest


def corrupt_table_root(db_file: Path, table: str) -> None:
    """Overwrite the root page of one table of an SQLite file with garbage (other tables intact), then write
    elsewhere in the file as any writer would, so that open connections drop their cached pages."""
    with sqlite3.connect(db_file) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone()[0]
    with open(db_file, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xa5" * page_size)
    with sqlite3.connect(db_file) as db:
        db.execute("PRAGMA user_version = 7")
