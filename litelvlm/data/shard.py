"""`--data.shard i/n`: the i-th (0-based) of n disjoint parts of a split's images, one part per job.

n independent jobs (a scheduler's array job) each evaluate one part; `tools/merge_runs.py` joins
their records. Parts are contiguous blocks of images in the split's order (images
[floor(i N / n), floor((i + 1) N / n)) of N), so they are disjoint, cover every image, and differ
in size by at most one image. Every item of an image (all its sentences under `per-sentence`) lands
in the image's part, and items keep their index in the whole split, so a part's records carry the
same sample ids as a run over the whole split.
"""

from __future__ import annotations

import re

from litelvlm.errors import DataError

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`"i/n"` -> (i, n), with 0 <= i < n; None stays None (the whole split)."""
    if text is None:
        return None
    match = _SHARD.match(str(text))
    if match is None:
        raise DataError(f"data.shard must be 'i/n' (the i-th of n parts, 0-based), got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise DataError(f"data.shard {text!r}: needs n >= 1 and 0 <= i < n (0-based: the parts of 3 are 0/3, 1/3, 2/3)")
    return index, count


def shard_items(samples, index: int, count: int, name: str) -> list[int]:
    """Item indices of part `index` of `count` of a split (`samples`: an indexed data set, whose
    `items` name each item's image record; a data set without an index shards its items)."""
    items = getattr(samples, "items", None)
    images = [record for record, _ in items] if items is not None else list(range(len(samples)))
    num_images = len(set(images))
    if count > num_images:
        raise DataError(f"data.shard {index}/{count}: split {name} has only {num_images} images, fewer than {count} parts")
    order = {image: position for position, image in enumerate(dict.fromkeys(images))}  # first appearance
    low, high = index * num_images // count, (index + 1) * num_images // count
    return [item for item, image in enumerate(images) if low <= order[image] < high]
