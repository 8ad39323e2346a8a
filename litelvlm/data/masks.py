"""COCO segmentations (polygons or RLE) to boolean masks, through pycocotools.

pycocotools is the reference rasteriser (the one COCO, RefCOCO and the GLaMM/LISA evaluations use),
so ground truth here matches theirs pixel for pixel (overlapping parts aside, see `polygons_to_mask`).
Its pixel (x, y) covers [x, x+1) x [y, y+1).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as coco_mask

from litelvlm.errors import DataError
from litelvlm.data.samples import Segmentation


class MalformedSegmentationError(DataError):
    """A segmentation is neither a valid polygon (list) nor a valid RLE (dict)."""


def _decode(rle) -> np.ndarray:
    """pycocotools' decode as a bool array, without the numpy-2 `__array__(copy=...)` deprecation
    warning that its compiled module emits on every call (harmless, and it floods logs)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="__array__ implementation doesn't accept", category=DeprecationWarning
        )
        return coco_mask.decode(rle).astype(bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


# A coordinate this many image sizes outside the image is garbage, and pycocotools would walk (and
# allocate) its whole edge: refused before it gets there.
MAX_OUTSIDE = 16


def _as_polygon_list(polygons: Sequence, height: int, width: int) -> list[list[float]]:
    """Accept one flat polygon or a list of flat polygons (parts); check each before pycocotools sees it.

    What passes is what pycocotools' `frPyObjects` rasterises, as the references call it (with the
    annotation's list of parts): the first part needs more than 4 coordinates (4 make it read the
    parts as boxes, which it then refuses for lists; fewer it refuses outright); any later part may
    be shorter (fewer than 3 points give no pixel), and an odd trailing coordinate is ignored.
    Refused here as well: non-numbers, which pycocotools meets with a bare type error, and
    non-finite or far-off coordinates, on which it exhausts memory.
    """
    if len(polygons) == 0:
        raise MalformedSegmentationError("empty polygon list (a no-target ref has no annotation instead)")
    if all(_is_number(value) for value in polygons):
        polygons = [polygons]
    limit = MAX_OUTSIDE * max(height, width, 1)
    checked = []
    for index, polygon in enumerate(polygons):
        if isinstance(polygon, (str, bytes, dict)) or not isinstance(polygon, (Sequence, np.ndarray)):
            raise MalformedSegmentationError(
                f"polygon {index} must be a flat list of numbers [x0, y0, x1, y1, ...], got {type(polygon).__name__}"
            )
        if not all(_is_number(value) for value in polygon):
            raise MalformedSegmentationError(f"polygon {index} holds something other than numbers: {list(polygon)[:8]}")
        coordinates = [float(value) for value in polygon]
        if not all(math.isfinite(value) for value in coordinates):
            raise MalformedSegmentationError(f"polygon {index} holds a non-finite coordinate")
        if any(abs(value) > limit for value in coordinates):
            raise MalformedSegmentationError(
                f"polygon {index} has a coordinate more than {MAX_OUTSIDE} image sizes outside the "
                f"{width}x{height} (w x h) image: {max(coordinates, key=abs)}"
            )
        checked.append(coordinates)
    if len(checked[0]) <= 4:
        raise MalformedSegmentationError(
            f"polygon 0 has {len(checked[0])} coordinates; pycocotools (the references' rasteriser) needs "
            "more than 4 in an annotation's first polygon"
        )
    return checked


def polygons_to_mask(polygons: Sequence, height: int, width: int) -> np.ndarray:
    """Rasterise one flat polygon or a list of polygons (their union) to a bool [height, width] mask.

    Overlapping parts count once: the references sum the parts' masks, so that an overlap holds 2
    and drops out of their metric; here it is object (docs/datasets.md, "Images and ground-truth masks").
    """
    polygon_list = _as_polygon_list(polygons, height, width)
    rles = coco_mask.frPyObjects(polygon_list, height, width)
    return _decode(coco_mask.merge(rles))


def rle_to_mask(rle: dict[str, Any], height: int, width: int) -> np.ndarray:
    """Decode a COCO RLE (compressed `counts` string/bytes, or uncompressed list of run lengths)."""
    if "size" not in rle or "counts" not in rle:
        raise MalformedSegmentationError(f"an RLE needs the keys 'size' and 'counts', got {sorted(rle)}")
    rle_height, rle_width = (int(value) for value in rle["size"])
    if (rle_height, rle_width) != (height, width):
        raise MalformedSegmentationError(
            f"RLE size {rle_height}x{rle_width} (h x w) does not match the image, {height}x{width}"
        )
    counts = rle["counts"]
    if isinstance(counts, list):
        if sum(counts) != height * width:
            raise MalformedSegmentationError(
                f"uncompressed RLE counts sum to {sum(counts)}, expected height*width = {height * width}"
            )
        compressed = coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    elif isinstance(counts, (str, bytes)):
        compressed = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        raise MalformedSegmentationError(f"RLE counts must be a string, bytes or a list, got {type(counts).__name__}")
    return _decode(compressed)


def segmentation_to_mask(segmentation: Segmentation, height: int, width: int) -> np.ndarray:
    """One annotation's COCO segmentation (polygon(s) or RLE) to a bool [height, width] mask."""
    if isinstance(segmentation, dict):
        return rle_to_mask(segmentation, height, width)
    if isinstance(segmentation, (Sequence, np.ndarray)) and not isinstance(segmentation, (str, bytes)):
        return polygons_to_mask(segmentation, height, width)
    raise MalformedSegmentationError(
        f"a segmentation is a polygon list or an RLE dict, got {type(segmentation).__name__}"
    )


def ref_mask(segmentations: Sequence[Segmentation], height: int, width: int) -> np.ndarray:
    """The target of a ref: the union of its annotations' masks, all zeros when it has none."""
    mask = np.zeros((height, width), dtype=bool)
    for segmentation in segmentations:
        mask |= segmentation_to_mask(segmentation, height, width)
    return mask
