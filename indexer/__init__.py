"""The batch indexer: `index-images` walks a folder and keeps its FAISS + SQLite index up to date.

From Python: `from indexer import index_folder`; `index_folder("data", "index")` -> RunReport.
"""
from indexer.config import ConfigError
from indexer.folder import index_folder
from indexer.locks import IndexBusy

__all__ = ["ConfigError", "IndexBusy", "index_folder"]
