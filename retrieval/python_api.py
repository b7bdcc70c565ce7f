"""The Python API's opened index: open_index() -> Index, to search by example, list neighbours and predict labels."""
from __future__ import annotations

import errno
import functools
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Union

import numpy as np
from PIL import Image

from retrieval.images.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageSource, decode_for_model
from retrieval.learning.metrics import vote
from retrieval.quality import absolute_index_dir
from retrieval.results import THUMBNAIL_PX, Hit, IndexInfo, Prediction, SearchResult
from retrieval.search.expansion import QueryExpansion

if TYPE_CHECKING:
    from retrieval.search.duplicates import DuplicateGroups
    from retrieval.search.index import ImageIndex
    from retrieval.search.snapshot import Hit as StoredHit, IndexSnapshot

# What Index.search takes: a file path (relative to the working folder, or absolute), encoded image bytes,
# a PIL image, or a uint8 array of shape (H, W, 3) (RGB; also (H, W) grey or (H, W, 4) RGBA).
Query = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image, np.ndarray]


class ImageNotIndexed(LookupError):
    """Index.neighbours was given an image the index does not hold."""


def open_index(index_dir: str | os.PathLike = "index", *, db_url: str | None = None, device: str = "cpu") -> Index:
    """Open an index folder made by index-images (or indexer.index_folder) for queries.

    index_dir: the index folder, relative to the working folder or absolute. db_url: the catalog's SQLAlchemy
    URL when it is not SQLite in the index folder. device: where query features are computed ("cpu",
    "cuda", "auto"). The index's own network is loaded (the one its vectors were made with).
    Use as a context manager, or call close(). Raises IndexNotFound (a FileNotFoundError) when the folder
    holds no index, WeightsUnavailable when its network cannot be rebuilt here.
    """
    return Index(index_dir, db_url=db_url, device=device)


class Index:
    """An opened index: search(query), neighbours(image), predict(query), duplicates(), len(index), index.info."""

    def __init__(self, index_dir: str | os.PathLike, *, db_url: str | None = None, device: str = "cpu"):
        from retrieval.search.index import ImageIndex

        self.index_dir = absolute_index_dir(index_dir)   # absolute once: later chdirs change nothing
        self._db_url, self._device = db_url, device
        self._opened: ImageIndex | None = ImageIndex(self.index_dir, db_url=db_url, device=device)

    def __reduce__(self) -> tuple:
        """Pickled as the way to open it again (a multiprocessing worker opens its own: network, vectors, catalog)."""
        self._index   # noqa: B018 - a closed index raises ValueError here, as elsewhere
        return functools.partial(open_index, db_url=self._db_url, device=self._device), (self.index_dir,)

    # lifetime
    def close(self) -> None:
        """Release the catalog's connections (the vectors and the network go with the object). Using the index
        afterwards raises ValueError, as a closed file does; closing again does nothing."""
        if self._opened is not None:
            self._opened.close()
            self._opened = None

    @property
    def _index(self) -> ImageIndex:
        if self._opened is None:
            raise ValueError(f"the index {self.index_dir} is closed; open it again with retrieval.open_index()")
        return self._opened

    def _snapshot(self) -> IndexSnapshot:
        """The index as it is on disk now, as a server sees it: what an index-images run (in this process or another)
        saved since the last call is swapped in first (a stat and one small query when nothing changed)."""
        index = self._index
        index.refresh()
        return index.snapshot()

    def __enter__(self) -> Index:
        self._index   # noqa: B018 - `with index:` on a closed index raises here, not at its first use inside
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # facts
    def __len__(self) -> int:
        return len(self._snapshot().vectors)

    @property
    def info(self) -> IndexInfo:
        """What the index holds and which network made it, as now: its network, images and labels, the FAISS type."""
        from retrieval.catalog import weights_label

        snapshot = self._snapshot()
        vectors = snapshot.describe_vectors()
        s = snapshot.settings
        return IndexInfo(self.index_dir, snapshot.data_dir, s.model, s.layer, weights_label(s), s.dim, s.normalize,
                         len(snapshot.vectors), snapshot.catalog.labels(), s.views, s.input_norm,
                         s.regions, vectors["type"], vectors["whitened_dim"])

    @property
    def data_dir(self) -> Path:
        """The indexed folder (absolute)."""
        return self._snapshot().data_dir

    def __repr__(self) -> str:
        if self._opened is None:
            return f"<Index {self.index_dir} (closed)>"
        i = self.info
        return f"<Index {i.index_dir}: {i.model} {i.layer}, weights {i.weights}, {i.count} images of {i.data_dir}>"

    # queries
    def features(self, query: Query) -> np.ndarray:
        """The query's feature vector, made as the index's vectors were. -> shape=(dim,) float32."""
        return self._embed(query)[1][0]

    def search(self, query: Query, k: int = 10, *, qe: int = 0, qe_alpha: float = 0.0) -> SearchResult:
        """The k images nearest to query, nearest first.

        query: a file path (str or Path; relative paths are taken from the working folder), encoded image
        bytes, a PIL image, or a uint8 numpy array (H, W, 3) RGB. Every kind is decoded and preprocessed as
        the indexer did (EXIF-upright, RGB, resize, centre crop): an indexed file searched by its path finds
        itself first at distance ~0. qe, qe_alpha: query expansion, the query averaged with its first qe results
        (weights similarity^qe_alpha) and searched again (docs/searching.md). Raises FileNotFoundError for a
        path to no file, ImageDecodeError (a ValueError) for what is not a usable image, TypeError for another
        kind of query, ValueError for qe settings out of range.
        """
        _check_k(k)
        expansion = QueryExpansion(qe, qe_alpha)
        snapshot, vector, described, preview = self._embed(query)
        hits = snapshot.search_vectors(vector, k, expansion=expansion)[0]
        return SearchResult(self._hits(snapshot, hits), described, k, preview)

    def neighbours(self, image: Hit | int | str | os.PathLike, k: int = 10) -> SearchResult:
        """The k nearest images to an indexed image, itself left out, from its stored vector (no forward pass).

        image: a Hit of an earlier result, its id (Hit.id), or its path: relative to the working folder, absolute, or relative to the
        data folder (as Hit.path). Raises ImageNotIndexed when the index does not hold it.
        """
        _check_k(k)
        snapshot = self._snapshot()    # the stored vector and the vectors it meets: one network
        record = self._record(snapshot, image)
        vector = snapshot.catalog.vector(record.id)
        if vector is None:
            raise ImageNotIndexed(f"image {image!r} left the index just now")
        hits = snapshot.search_vectors(vector[None, :], k, exclude=[{record.id}])[0]
        return SearchResult(self._hits(snapshot, hits), f"image {record.id} ({record.path})", k)

    def predict(self, query: Query, k: int = 10) -> Prediction:
        """A label for query by its k nearest neighbours' majority vote (ties go to the closer group).

        query as for search(). An indexed image is its own nearest neighbour, so it votes for its own label:
        predict new images, or see evaluate() for leave-one-out accuracy."""
        found = self.search(query, k)
        voted = vote(found.hits, len(found.hits)) if found.hits else None   # the same vote as the API and evaluate-index
        if voted is None:
            return Prediction(None, 0, 0, found)
        return Prediction(voted["label"], voted["votes"], voted["k"], found)

    def duplicates(self, *, threshold: float | None = None, calibration_images: int | None = None) -> DuplicateGroups:
        """Groups of near-duplicate images, as `find-duplicates` makes them (docs/duplicates.md): every two images of
        a group closer than the threshold, between vectors whitened on this collection, and byte-identical files
        always together; each group starts with its suggested keeper (the largest, then the oldest), groups largest
        first. threshold: None calibrates it on the collection (edited copies of calibration_images of its images,
        24 by default, through the index's network: needs the image files); a number skips that. Nothing is
        changed.

        -> DuplicateGroups: .groups (lists of DuplicateImage: id, path, label, width, height, size in bytes,
        mtime_ns, sha256, distance to the keeper, link_to: the member whose file this symlink or hard link names too,
        else None), .threshold (.value, .describe(), .caution()), .images, .to_json(). Raises DuplicatesError (a ValueError) for a threshold not in (0, 2), when there is nothing to
        group or no image file to calibrate on."""
        from retrieval.search.duplicates import DuplicatesError, find_duplicates

        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number))):
            raise TypeError(f"threshold is a number (a distance between whitened vectors) or None, not {threshold!r}")
        if calibration_images is not None and (isinstance(calibration_images, bool) or not isinstance(
                calibration_images, (int, np.integer)) or calibration_images < 1):
            raise DuplicatesError(f"calibration_images is a whole number of at least 1 (or None: 24), not "
                                  f"{calibration_images!r}")
        given = {} if calibration_images is None else {"calibration_images": int(calibration_images)}
        self._snapshot()   # the index as on disk now
        return find_duplicates(self._index, threshold=threshold, **given)

    # inside
    def _embed(self, query: Query) -> tuple[IndexSnapshot, np.ndarray, str, Image.Image | None]:
        """-> (the snapshot used, the query's vector shape=(1, dim) float32, the query in words, its preview)."""
        import torch

        source, described = query_source(query)
        if isinstance(source, str) and not os.path.exists(source):
            given = Path(os.fspath(query)).expanduser()   # as typed: source is made absolute from the working folder
            in_data = not given.is_absolute() and (self._snapshot().data_dir / given).is_file()
            raise FileNotFoundError(errno.ENOENT, "no such file (paths are taken from the working folder" + (
                "; this is an indexed image's path, relative to the data folder: search hit.file, or "
                "index.neighbours(path) for its neighbours" if in_data else "") + ")", described)
        snapshot = self._snapshot()
        assert snapshot.extractor is not None, "the index was opened without its network"
        try:
            decoded = decode_for_model(source, snapshot.extractor.preprocessing, max_pixels=DEFAULT_MAX_PIXELS,
                                       preview_size=THUMBNAIL_PX)
        except ImageDecodeError as exc:
            if isinstance(source, str):   # a file: say which
                raise ImageDecodeError(f"{described}: {exc}") from exc
            raise
        vector = snapshot.embed(torch.from_numpy(decoded.pixels).unsqueeze(0))   # (1, 3, 224, 224) -> (1, dim)
        return snapshot, vector, described, decoded.preview

    @staticmethod
    def _hits(snapshot: IndexSnapshot, hits: list[StoredHit]) -> list[Hit]:
        data_dir = snapshot.data_dir
        return [Hit(h.id, h.path, h.label, h.distance, data_dir / h.path) for h in hits]

    def _record(self, snapshot: IndexSnapshot, image: Hit | int | str | os.PathLike):  # noqa: ANN202 - ImageRecord
        hit = image if isinstance(image, Hit) else None
        if hit is not None:
            image = hit.id
        if isinstance(image, (int, np.integer)) and not isinstance(image, bool):
            record = snapshot.catalog.get(int(image))
        elif isinstance(image, (str, os.PathLike)):
            record = snapshot.catalog.get_by_path(stored_path(image, snapshot.data_dir))
        else:
            raise TypeError(f"a Hit, an image id (int) or a path, not {type(image).__name__}")
        if record is None:
            shown = os.fspath(image) if isinstance(image, (str, os.PathLike)) else int(image)
            raise ImageNotIndexed(f"the index holds no image {shown!r}; search() takes any image file")
        if hit is not None and record.path != hit.path:   # a hit of another index, or of this one before a rebuild
            raise ImageNotIndexed(f"this hit ({hit.path}, id {hit.id}) is not this index's image {hit.id} "
                                  f"({record.path}): a result of another index, or of this one before it changed; "
                                  "search again, or pass the path")
        return record


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a whole number of at least 1, not {k!r}")


def stored_path(path: str | os.PathLike, data_dir: Path) -> str:
    """A path as the catalog stores it (relative to the data folder, '/' separators): an absolute path, or one
    relative to the working folder, inside the data folder; else the path is taken as relative to the data folder."""
    given = Path(path).expanduser()
    full = Path(os.path.abspath(given))   # not resolve(): a symlink inside the data folder is stored by its own name
    if full.is_relative_to(data_dir):
        return full.relative_to(data_dir).as_posix()
    return given.as_posix()


def query_source(query: Query) -> tuple[ImageSource, str]:
    """A query -> (what decode_for_model reads: a path or encoded bytes, the query in words).

    Pixels (a PIL image, an array) are encoded as PNG in memory, losslessly, so they take the one decoding
    path files take (mode conversion, EXIF orientation, resize, crop), not a copy of it."""
    if isinstance(query, (str, os.PathLike)):
        if not os.fspath(query):
            raise ValueError("the query path is empty: give an image file's path")
        return os.path.abspath(Path(query).expanduser()), os.fspath(query)
    if isinstance(query, (bytes, bytearray, memoryview)):
        return bytes(query), f"{len(query):,} bytes of image"
    if hasattr(query, "read") and not isinstance(query, Image.Image):   # an open binary file, io.BytesIO
        if isinstance(query, io.TextIOBase):   # read() would fail decoding the image's bytes as text first
            raise TypeError("a file object query must be opened in binary mode ('rb')")
        data = query.read()
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("a file object query must be opened in binary mode ('rb')")
        return bytes(data), f"{len(data):,} bytes read from {getattr(query, 'name', type(query).__name__)}"
    if isinstance(query, Image.Image):
        return png_bytes(query), f"PIL image {query.width}x{query.height} {query.mode}"
    if isinstance(query, np.ndarray):
        return png_bytes(array_image(query)), f"array {query.shape} {query.dtype}"
    if isinstance(query, Hit):
        raise TypeError("search takes an image, not a Hit: neighbours(hit) searches from an indexed image's stored "
                        "vector, search(hit.file) from its file")
    raise TypeError(f"search takes a file path, image bytes, a binary file object, a PIL image or a uint8 array (H, W, 3), "
                    f"not {type(query).__name__}")


def array_image(pixels: np.ndarray) -> Image.Image:
    """uint8 shape=(H, W, 3) RGB (or (H, W) grey, (H, W, 4) RGBA) -> PIL image. Raises ValueError for other arrays."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8 (0-255), not {pixels.dtype}; "
                         "e.g. (x * 255).clip(0, 255).astype(np.uint8) for floats in [0, 1]")
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (3, 4))):
        raise ValueError(f"an image array has shape (H, W, 3) (RGB), (H, W, 4) or (H, W), not {pixels.shape}")
    if 0 in pixels.shape[:2]:
        raise ValueError(f"an image array needs at least one pixel, not shape {pixels.shape}")
    return Image.fromarray(np.ascontiguousarray(pixels))


PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")   # modes PNG stores as they are


def png_bytes(img: Image.Image) -> bytes:
    """A PIL image -> PNG bytes (fast, lossless), its EXIF kept so the decoder turns it upright as it would the file."""
    out = io.BytesIO()
    if img.mode == "I":   # 32-bit integers, which PNG cannot store: TIFF can, and is decoded as such a file would be
        img.save(out, "TIFF")
        return out.getvalue()
    if img.mode not in PNG_MODES:   # CMYK, YCbCr, LAB, HSV, F: RGB as the decoder would make it
        img = img.convert("RGB")
    exif = img.getexif()
    img.save(out, "PNG", compress_level=1, **({"exif": exif} if len(exif) else {}))
    return out.getvalue()
