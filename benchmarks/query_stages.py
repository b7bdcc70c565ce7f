"""Where a lone query's time goes, stage by stage, timed in one process on bench_query.py's index: the served path's
stages (receive, decode in this process and in a decoder worker, forward in fp32 and bf16, scan of the served index
and of compact float16 / SQ8 copies with their recall against exact, catalog lookup, JSON) and the naive server's.

The compact copies hold the vectors the served index holds (whitened by its own whitening where it has one, as
`index-images --index-type SQfp16` would build them: `PCAW256,L2norm,SQfp16`), their scans include that whitening of
the query, and every recall is against exact search in that same space."""
from __future__ import annotations

import io
import json
import statistics
import time
from pathlib import Path
from typing import Callable

BOUNDARY = "benchqueryboundary"


def stage_table(index: Path, bodies: list[bytes], k: int, rounds: int) -> dict:
    """-> {"ours": {stage: median ms}, "naive": {stage: median ms}, "recall": {type: 10-recall@10}, "settings": {...}}.
    recall: the served index's and each compact copy's 10-recall@10 against exact L2 search over the served index's
    own vectors (whitened, where it whitens).

    bodies: multipart bodies as bench_query posts them. Each round times every stage once, on the round's query, in
    turn, so the load falls on all alike; medians over rounds."""
    import faiss
    import numpy as np
    import torch
    from PIL import Image
    from torchvision import models
    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Request

    from retrieval.features.backbones import FeatureExtractor, load_state_dict
    from retrieval.features.precision import cpu_bf16_instructions
    from retrieval.images.decode import decode_for_model
    from retrieval.images.decode_pool import DecodePool
    from retrieval.search.index import ImageIndex
    from retrieval.search.snapshot import embed
    from retrieval.vectors.whitening import whiten_prefix, whitening_of

    served = ImageIndex(index)
    snapshot = served.snapshot()
    settings, prep = snapshot.settings, snapshot.extractor.preprocessing
    state, _ = load_state_dict(settings.model, settings.weights_choice, index, seed=settings.seed)
    cpu = torch.device("cpu")
    extractors = {"fp32": FeatureExtractor(settings.model, settings.layer, state, cpu, "fp32")}
    if cpu_bf16_instructions():
        extractors["bf16"] = FeatureExtractor(settings.model, settings.layer, state, cpu, "bf16")
    ids, vectors = map(np.concatenate, zip(*snapshot.catalog.vectors()))        # (N,), (N, D) float32
    served_factory = (snapshot.catalog.vector_index_record() or {}).get("factory", snapshot.vectors.factory)
    whitening = whitening_of(snapshot.vectors.index)
    whiten = whitening or (lambda x: x)                              # the served index's space: (n, D) -> (n, d)
    stored = whiten(vectors)                                                     # (N, d): what the served index holds
    prefix = whiten_prefix(stored.shape[1]) if whitening else ""                # "PCAW256,L2norm," or ""
    compact = {}
    for factory in ("SQfp16", "SQ8"):
        sq = faiss.index_factory(stored.shape[1], factory)
        sq.train(stored)
        sq.add(stored)
        compact[prefix + factory] = sq

    def files(body: bytes) -> bytes:
        environ = EnvironBuilder(method="POST", data=body,
                                 content_type=f"multipart/form-data; boundary={BOUNDARY}").get_environ()
        return Request(environ).files["image"].read()

    uploads = [files(b) for b in bodies]
    crops = [torch.from_numpy(decode_for_model(u, prep).pixels).unsqueeze(0) for u in uploads]   # (1, 3, 224, 224)
    queries = np.concatenate([embed(extractors["fp32"], c, settings.normalize) for c in crops])   # (Q, D)
    flat = faiss.IndexFlatL2(stored.shape[1])
    flat.add(stored)
    exact = ids[flat.search(whiten(queries), k)[1]]                              # (Q, k): exact, in the served space

    def recall_of(found: np.ndarray) -> float:
        return round(float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact)])), 4)

    recall = {f"{served_factory} (served)": recall_of(snapshot.vectors.search(queries, k)[1])}
    for factory, sq in compact.items():
        recall[factory] = recall_of(ids[sq.search(whiten(queries), k)[1]])

    plain = models.alexnet()
    plain.load_state_dict({key: v for key, v in state.items()})
    plain.classifier = plain.classifier[:6]
    plain.eval()
    transform = models.AlexNet_Weights.IMAGENET1K_V1.transforms()
    pool = DecodePool(1, 10.0)

    looked_up = [snapshot.catalog.get_many(int(x) for x in found) for found in exact]

    def hits_json(i: int) -> str:
        rows = looked_up[i]
        return json.dumps({"results": [{"id": r.id, "path": r.path, "label": r.label, "distance": 0.5,
                                        "image_url": f"/images/{r.id}", "thumbnail_url": f"/images/{r.id}/thumbnail",
                                        "gallery_url": f"/gallery/images/{r.id}"} for r in rows.values()],
                           "index": {"model": settings.model, "layer": settings.layer, "count": len(ids)}})

    def naive_forward(i: int) -> None:
        with torch.no_grad():
            plain(transform(Image.open(io.BytesIO(uploads[i])).convert("RGB")).unsqueeze(0))

    ours: dict[str, Callable[[int], object]] = {
        "receive (multipart parse)": lambda i: files(bodies[i]),
        "decode in this process": lambda i: decode_for_model(uploads[i], prep),
        "decode in a worker (hand-off included)": lambda i: pool.decode(uploads[i], prep, max_pixels=None,
                                                                         max_decoded_pixels=None),
        **{f"forward {name}": (lambda i, e=e: embed(e, crops[i], settings.normalize)) for name, e in extractors.items()},
        f"scan {served_factory} (served)": lambda i: snapshot.vectors.search(queries[i:i + 1], k),
        **{f"scan {factory}": (lambda i, sq=sq: sq.search(whiten(queries[i:i + 1]), k)) for factory, sq in compact.items()},
        "catalog lookup (k rows)": lambda i: snapshot.catalog.get_many(int(x) for x in exact[i]),
        "catalog: has labels (each answer)": lambda i: snapshot.catalog.has_labels(),
        "JSON": hits_json,
    }
    naive: dict[str, Callable[[int], object]] = {
        "decode (Pillow) + transforms": lambda i: transform(Image.open(io.BytesIO(uploads[i])).convert("RGB")),
        "decode + transforms + forward": naive_forward,
        "numpy brute force": lambda i: np.argsort(np.linalg.norm(vectors - queries[i], axis=1) ** 2)[:k],
        # what a user who knows the vectors are unit length writes instead: one matrix-vector product
        "numpy brute force as a dot product": lambda i: np.argsort(-(vectors @ queries[i]))[:k],
    }
    times: dict[str, list[float]] = {f"{side}:{name}": [] for side, stages in (("ours", ours), ("naive", naive))
                                     for name in stages}
    try:
        for r in range(rounds + 1):                       # round 0 warms every stage up
            i = r % len(bodies)
            for side, stages in (("ours", ours), ("naive", naive)):
                for name, stage in stages.items():
                    started = time.perf_counter()
                    stage(i)
                    if r:
                        times[f"{side}:{name}"].append(time.perf_counter() - started)
    finally:
        pool.close()
        served.close()
    medians = {key: round(statistics.median(t) * 1000.0, 2) for key, t in times.items()}
    table = {side: {key.split(":", 1)[1]: v for key, v in medians.items() if key.startswith(side + ":")}
             for side in ("ours", "naive")}
    table["naive"]["forward (by difference)"] = round(table["naive"]["decode + transforms + forward"]
                                                      - table["naive"]["decode (Pillow) + transforms"], 2)
    return {**table, "recall": recall, "settings": {"rounds": rounds, "k": k, "vectors": int(len(ids)),
                                                    "served_factory": served_factory,
                                                    "served_precision": snapshot.extractor.precision}}


def print_stage_table(stages: dict, lone: dict | None) -> None:
    """The table in Markdown; lone: the HTTP medians {"ours": p50 ms, "naive": p50 ms}, to show what HTTP adds."""
    print("\nWhere a lone query's time goes (ms, medians; in-process, one stage at a time)")
    print("| stage | served path | naive server |")
    print("|---|---:|---:|")
    for name, ms in stages["ours"].items():
        print(f"| {name} | {ms:.2f} | |")
    for name, ms in stages["naive"].items():
        print(f"| naive: {name} | | {ms:.2f} |")
    if lone:
        print(f"| whole request over HTTP, p50 | {lone['ours']:.1f} | {lone['naive']:.1f} |")
    print("10-recall@10 against exact search in the served index's space: "
          + ", ".join(f"{t} {r:.4f}" for t, r in stages["recall"].items()))
