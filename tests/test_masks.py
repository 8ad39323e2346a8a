"""Ground-truth masks against pycocotools as the references call it, and images turned upright by EXIF.

The expected masks are pycocotools' own: `frPyObjects(parts, h, w)` on the annotation's list of
parts and `decode`, as GLaMM's and LISA's refer datasets do; the union over parts (`> 0`) is what
the framework keeps, where the references' sum can reach 2 (docs/datasets.md).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from litelvlm.data.images import decode_rgb
from litelvlm.data.masks import MalformedSegmentationError, polygons_to_mask, segmentation_to_mask

HEIGHT, WIDTH = 12, 16


def reference_sum(parts: list[list[float]]) -> np.ndarray:
    """The references' mask: one decoded map per part, summed over the parts (uint8, may hold 2)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = coco_mask.decode(coco_mask.frPyObjects(parts, HEIGHT, WIDTH))
    return decoded.sum(axis=2)


TRIANGLE = [1.0, 1.0, 9.0, 2.0, 4.0, 8.0]
SQUARE = [6.0, 3.0, 14.0, 3.0, 14.0, 11.0, 6.0, 11.0]
CASES = {
    "triangle": [TRIANGLE],
    "fractional vertices on pixel centres": [[0.5, 0.5, 7.5, 0.5, 7.5, 4.5, 0.5, 4.5]],
    "later part of 2 points": [TRIANGLE, [2.0, 2.0, 10.0, 9.0]],
    "later part of 1 point": [SQUARE, [3.0, 3.0]],
    "later part empty": [SQUARE, []],
    "later part of 3 coordinates": [SQUARE, [1.0, 1.0, 5.0]],
    "odd trailing coordinate": [TRIANGLE + [15.0]],
    "first part of 5 coordinates": [[1.0, 1.0, 9.0, 1.0, 9.0]],
    "collinear points": [[1.0, 1.0, 5.0, 5.0, 9.0, 9.0]],
    "one repeated point": [[4.0, 4.0, 4.0, 4.0, 4.0, 4.0]],
    "zero-width sliver": [[3.0, 1.0, 3.0, 10.0, 3.0, 1.0, 3.0, 10.0]],
    "self-intersecting bow tie": [[1.0, 1.0, 12.0, 10.0, 12.0, 1.0, 1.0, 10.0]],
    "partly outside the image": [[-5.0, -3.0, 30.0, -3.0, 30.0, 6.0, -5.0, 6.0]],
    "two disjoint parts": [[0.0, 0.0, 4.0, 0.0, 4.0, 4.0, 0.0, 4.0], [10.0, 8.0, 15.0, 8.0, 15.0, 12.0, 10.0, 12.0]],
    "two overlapping parts": [TRIANGLE, SQUARE],
}


@pytest.mark.parametrize("parts", CASES.values(), ids=CASES.keys())
def test_every_polygon_pycocotools_accepts_gives_its_pixels(parts):
    expected = reference_sum(parts) > 0
    np.testing.assert_array_equal(polygons_to_mask(parts, HEIGHT, WIDTH), expected)
    np.testing.assert_array_equal(segmentation_to_mask([np.array(p) for p in parts], HEIGHT, WIDTH), expected)


def test_short_later_parts_add_no_pixel_and_a_flat_polygon_is_one_part():
    square = polygons_to_mask([SQUARE], HEIGHT, WIDTH)
    assert square.sum() == 64  # x 6..14, y 3..11: 8 x 8 pixels
    for short in ([2.0, 2.0, 10.0, 9.0], [3.0, 3.0], [], [1.0, 1.0, 5.0]):
        np.testing.assert_array_equal(polygons_to_mask([SQUARE, short], HEIGHT, WIDTH), square)
    np.testing.assert_array_equal(polygons_to_mask(SQUARE, HEIGHT, WIDTH), square)
    assert not polygons_to_mask([1.0, 1.0, 9.0, 1.0, 9.0], HEIGHT, WIDTH).any()  # 2 points: a line, no area


def test_overlapping_parts_are_object_where_the_references_sum_to_two():
    parts = CASES["two overlapping parts"]
    summed = reference_sum(parts)
    overlap = summed == 2
    assert overlap.sum() > 0  # the case does overlap
    mask = polygons_to_mask(parts, HEIGHT, WIDTH)
    assert mask[overlap].all() and mask.sum() == (summed > 0).sum()


@pytest.mark.parametrize("first", [[], [1.0, 1.0], [1.0, 1.0, 5.0], [1.0, 1.0, 5.0, 5.0]])
def test_a_first_part_pycocotools_refuses_is_a_clear_error(first):
    with pytest.raises(Exception):  # pycocotools itself refuses these (a box reading, or no reading)
        reference_sum([first, SQUARE])
    with pytest.raises(MalformedSegmentationError, match=f"polygon 0 has {len(first)} coordinates"):
        polygons_to_mask([first, SQUARE], HEIGHT, WIDTH)


def upright_and_stored(orientation: int) -> tuple[np.ndarray, bytes]:
    """A 24 x 16 (w x h) picture of six coloured 8 x 8 blocks, and a JPEG that stores it turned as
    the EXIF orientation says, tagged so (blocks on JPEG's 8 x 8 grid, no chroma subsampling)."""
    colours = np.array([[(250, 0, 0), (0, 250, 0), (0, 0, 250)], [(250, 250, 0), (0, 250, 250), (0, 0, 0)]])
    upright = np.kron(colours, np.ones((8, 8, 1))).astype(np.uint8)
    # EXIF: 3 = stored rotated by 180; 6 = stored rotated 90 degrees anticlockwise (shown turned
    # clockwise); 8 = stored rotated 90 degrees clockwise (shown turned anticlockwise).
    stored = {3: np.rot90(upright, 2), 6: np.rot90(upright, 1), 8: np.rot90(upright, -1)}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(stored)).save(buffer, format="JPEG", quality=100, subsampling=0, exif=exif)
    return upright, buffer.getvalue()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_images_are_turned_upright_by_their_exif_orientation(orientation):
    upright, data = upright_and_stored(orientation)
    image = decode_rgb(io.BytesIO(data))
    assert image.mode == "RGB" and image.size == (24, 16)
    pixels = np.asarray(image).astype(int)
    assert (abs(pixels - upright.astype(int)) < 40).all()  # JPEG is lossy; a wrong turn is off by ~250
