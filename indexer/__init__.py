"""The batch indexer: `index-images` walks a folder and keeps its FAISS + SQLite index up to date.

From Python: `from indexer import index_folder`; `index_folder("data", "index")` -> RunReport.
"""
from indexer.folder import index_folder

__all__ = ["index_folder"]
