"""The edited copies used by the copy-search measures: each edit changes the picture, and a seed repeats it."""
from PIL import Image

from retrieval.images.edits import EDITS, edited_copies
from retrieval.samples import draw_sample


def test_every_edit_changes_the_picture_and_a_seed_repeats_it():
    import random
    img = draw_sample("red_circles", (320, 240), random.Random(3))
    first, again, other = edited_copies(img, 1), edited_copies(img, 1), edited_copies(img, 2)
    assert set(first) == set(EDITS)
    for name, copy in first.items():
        assert copy.mode == "RGB"
        assert copy.size != img.size or copy.tobytes() != img.convert("RGB").tobytes(), name
        assert copy.tobytes() == again[name].tobytes(), name
    assert first["crop"].tobytes() != other["crop"].tobytes()


def test_an_unknown_edit_is_named():
    import pytest
    with pytest.raises(ValueError, match="unknown edit 'sepia'"):
        edited_copies(Image.new("RGB", (64, 64)), 0, ["sepia"])
