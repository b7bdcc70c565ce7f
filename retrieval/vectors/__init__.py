"""FAISS vector indexes derived from the catalog: types, building and training, recall against exact search."""
