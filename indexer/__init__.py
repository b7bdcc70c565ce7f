"""The batch indexer: `index-images` walks a folder and keeps its FAISS + SQLite index up to date."""
