"""The query server a user would write first, bench_query.py's baseline: Flask's own server, Pillow, the weights'
torchvision transforms, one forward pass of torchvision's AlexNet (cut at fc7) per request, numpy brute force.

Serves POST /search (multipart field `image`, ?k=) over an index folder made by index-images --weights random:
the same network (the index's saved weights) and the same vectors (read from its catalog at start-up), so its
answers are the real server's, computed the plain way. GET /healthz answers 200 once loaded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    import numpy as np
    import torch
    from flask import Flask, jsonify, request
    from PIL import Image
    from torchvision import models

    from retrieval.catalog import Catalog
    from retrieval.names import random_weights_file

    net = models.alexnet()
    net.load_state_dict(torch.load(random_weights_file(args.index_dir, "alexnet"), weights_only=True))
    net.classifier = net.classifier[:6]          # up to fc7's ReLU
    net.eval()
    transform = models.AlexNet_Weights.IMAGENET1K_V1.transforms()
    catalog = Catalog(args.index_dir)
    ids, vectors = zip(*catalog.vectors())
    ids, vectors = np.concatenate(ids), np.concatenate(vectors)   # (N,), (N, 4096) float32
    rows = catalog.get_many(ids.tolist())
    app = Flask(__name__)

    @app.get("/healthz")
    def healthz():  # noqa: ANN202
        return {"ok": True}

    @app.post("/search")
    def search():  # noqa: ANN202
        k = int(request.args.get("k", 10))
        image = Image.open(request.files["image"].stream).convert("RGB")
        with torch.no_grad():
            query = net(transform(image).unsqueeze(0))[0].numpy()
        query = query / np.linalg.norm(query)
        distances = np.linalg.norm(vectors - query, axis=1) ** 2
        nearest = np.argsort(distances)[:k]
        return jsonify({"results": [{"id": int(ids[i]), "path": rows[int(ids[i])].path,
                                     "label": rows[int(ids[i])].label, "distance": float(distances[i])}
                                    for i in nearest]})

    app.run(host="127.0.0.1", port=args.port, threaded=True)


if __name__ == "__main__":
    main()
