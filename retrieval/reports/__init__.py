"""Charts and pictures of results: training curves, first-layer filters, precision@k."""
