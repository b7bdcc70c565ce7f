"""An opened index: the exact network that made it, its vectors and catalog, searched by image or by id."""
