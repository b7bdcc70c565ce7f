"""Transfer learning: how far the features go on labelled classes (evaluation) and fine-tuning the network."""
