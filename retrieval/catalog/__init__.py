"""The catalog: image rows with their vectors, the index settings and runs, in SQLite or PostgreSQL through SQLAlchemy."""
