"""Image retrieval on deep CNN features: backbones, preprocessing, catalog, vector index, search."""
