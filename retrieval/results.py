"""What the Python API answers: hits, search results, predictions and index facts, as dataclasses that show
themselves as HTML in Jupyter (thumbnails inline as small JPEG data URIs)."""
from __future__ import annotations

import base64
import dataclasses
import html
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, overload

from retrieval.images.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, jpeg_bytes, thumbnail_rgb

if TYPE_CHECKING:
    from PIL import Image

THUMBNAIL_PX = 96        # long side of the thumbnails in _repr_html_
THUMBNAIL_QUALITY = 80   # their JPEG quality: a 96 px thumbnail is 2-4 KB of base64
MAX_SHOWN = 50           # hits drawn in _repr_html_; the rest are counted


@dataclasses.dataclass(frozen=True)
class Hit:
    """One neighbour: its catalog row and how far it is from the query."""
    id: int                # the image's id in the catalog (Index.neighbours takes it)
    path: str              # relative to the index's data folder, with '/' separators, as stored
    label: str | None      # its class folder; None for an image outside class folders
    distance: float        # L2 distance in feature space (not squared); 0 for the query itself
    file: Path             # the absolute path of the file (data folder / path), for thumbnails or opening it

    def to_json(self) -> dict:
        """Plain data for json.dumps: search-images --json's fields, and the file as text."""
        return {"id": self.id, "path": self.path, "label": self.label, "distance": self.distance, "file": str(self.file)}


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The k nearest images to one query, nearest first. Iterable and indexable like its list of hits."""
    hits: list[Hit]
    query: str                                     # what was searched, in words ("data/x.jpg", "PIL image 320x240 RGB")
    k: int                                         # how many were asked for (fewer come back from a small index)
    query_image: Image.Image | None = dataclasses.field(default=None, repr=False, compare=False)
    # the query as decoded, upright, long side <= THUMBNAIL_PX; None for a stored image's neighbours

    def __len__(self) -> int:
        return len(self.hits)

    def __iter__(self) -> Iterator[Hit]:
        return iter(self.hits)

    @overload
    def __getitem__(self, i: int) -> Hit: ...
    @overload
    def __getitem__(self, i: slice) -> list[Hit]: ...

    def __getitem__(self, i: int | slice) -> Hit | list[Hit]:
        return self.hits[i]

    @property
    def labels(self) -> list[str | None]:
        """The hits' labels, nearest first (None: an image outside class folders)."""
        return [h.label for h in self.hits]

    @property
    def distances(self) -> list[float]:
        """The hits' distances, nearest first (Hit.distance)."""
        return [h.distance for h in self.hits]

    def to_json(self) -> dict:
        """Plain data for json.dumps: {"query", "k", "results": [Hit.to_json(), ...]}."""
        return {"query": self.query, "k": self.k, "results": [h.to_json() for h in self.hits]}

    def __str__(self) -> str:
        """A table, as search-images prints it."""
        rows = [f"{rank:>4}  {h.distance:>8.4f}  {h.label or '-':<16}  {h.path}" for rank, h in enumerate(self.hits, 1)]
        return "\n".join([f"{len(self.hits)} nearest to {self.query}", f"{'rank':>4}  {'distance':>8}  {'label':<16}  path",
                          *rows])

    def _repr_html_(self) -> str:
        head = f"<p><b>{len(self.hits)} nearest</b> to {html.escape(self.query)}</p>"
        if self.query_image is not None:
            head = (f'<div style="display:flex;align-items:center;gap:8px">'
                    f'{_img(image_data_uri(self.query_image), "the query")}{head}</div>')
        return head + hits_html(self.hits)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A label by the neighbours' majority vote (ties to the closer group, then to the nearer neighbour)."""
    label: str | None        # None when no neighbour has a label
    votes: int               # neighbours that voted for it
    voters: int              # neighbours with a label (the ones that voted), at most k
    neighbours: SearchResult = dataclasses.field(repr=False)   # shown by _repr_html_, not in the text repr

    def _repr_html_(self) -> str:
        if self.label is None:
            said = "<p>no prediction: none of the neighbours has a label</p>"
        else:
            said = (f"<p>predicted <b>{html.escape(self.label)}</b>: {self.votes} of {self.voters} "
                    f"labelled neighbours</p>")
        return said + self.neighbours._repr_html_()


@dataclasses.dataclass(frozen=True)
class IndexInfo:
    """What an opened index holds and which network made it."""
    index_dir: Path
    data_dir: Path                    # the folder that was indexed (absolute)
    model: str                        # "alexnet" | "vgg16"
    layer: str                        # "fc7", "fc6", or a pooled last conv block: "conv5-gem", ...
    weights: str                      # "imagenet", "random", or a weights file's name and short hash
    dim: int                          # vector length (4096 for fc layers; 256 or 512 pooled)
    normalize: bool                   # vectors L2-normalised
    count: int                        # images in the index
    labels: dict[str | None, int]     # images per label (None: unlabelled)
    views: str = "single"             # descriptors of the image alone, or averaged over "flip" / "flip+scales" views
    input_norm: str = "weights"       # input normalised by the weights' mean and std, or by each image's own ("image")
    regions: int = 0                  # regional vectors per image besides its own (index-images --regions; 0: none)
    index_type: str = "Flat"          # the FAISS type searched ("PCAW64,L2norm,Flat": whitened to 64 dimensions)
    whitened_dim: int | None = None   # the dimensions searches compare vectors in when the index whitens (Hit.distance
                                      # is measured there, not between features()); None: the features themselves


# --- HTML -------------------------------------------------------------------------------------------

def image_data_uri(img: Image.Image) -> str:
    """An RGB image (small) -> "data:image/jpeg;base64,..."."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg_bytes(img, quality=THUMBNAIL_QUALITY)).decode("ascii")


def thumbnail_data_uri(file: Path, size: int = THUMBNAIL_PX) -> str | None:
    """A file's thumbnail (upright, long side <= size) as a JPEG data URI; None when it cannot be read now."""
    try:
        return image_data_uri(thumbnail_rgb(file, size, max_pixels=DEFAULT_MAX_PIXELS))
    except ImageDecodeError:   # moved, deleted or changed since it was indexed
        return None


def _img(uri: str | None, title: str) -> str:
    box = f"width:{THUMBNAIL_PX}px;height:{THUMBNAIL_PX}px;object-fit:contain;background:#eee"
    if uri is None:
        return (f'<div style="{box};display:flex;align-items:center;justify-content:center;font-size:11px" '
                f'title="{html.escape(title)}">not readable</div>')
    return f'<img src="{uri}" style="{box}" title="{html.escape(title)}" alt="{html.escape(title)}">'


def hits_html(hits: list[Hit], limit: int = MAX_SHOWN) -> str:
    """Hits as a grid of thumbnails, each with its rank, label, distance and id (the path in its tooltip)."""
    cells = []
    for rank, hit in enumerate(hits[:limit], 1):
        label = "(no label)" if hit.label is None else hit.label
        cells.append(
            '<figure style="margin:0;width:%dpx;font-size:11px;text-align:center;overflow-wrap:anywhere">%s'
            '<figcaption>%d. <b>%s</b><br>d = %.4f &middot; id %d</figcaption></figure>'
            % (THUMBNAIL_PX + 16, _img(thumbnail_data_uri(hit.file), hit.path), rank, html.escape(label),
               hit.distance, hit.id))
    more = f"<p>... and {len(hits) - limit} more</p>" if len(hits) > limit else ""
    return f'<div style="display:flex;flex-wrap:wrap;gap:6px">{"".join(cells)}</div>{more}'
