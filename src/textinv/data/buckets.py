"""Aspect-ratio buckets (``--enable_bucket``): each image trains at the bucket size nearest its aspect ratio.

The bucket list follows kohya-ss sd-scripts' rule (``make_bucket_resolutions`` in library/model_util.py):
for every width from ``min_reso`` to ``max_reso`` in ``step`` pixels, the height that keeps the area at most
the training resolution's (in whole steps), both ways round, plus the square of that area. Here only
buckets whose both sides lie in [min_reso, max_reso] are kept. An image goes to the bucket whose aspect
ratio is nearest its own and is resized to it whole: no crop (the aspect ratio moves by at most the
distance to that bucket), so everything at its edges is trained on.

Torch-free: :mod:`textinv.data.options` validates the range with it before torch loads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

BucketSize = tuple[int, int]  # (height, width) in pixels


def bucket_sizes(area: int, min_reso: int, max_reso: int, step: int) -> list[BucketSize]:
    """Every bucket (height, width) of at most ``area`` pixels with both sides in [min_reso, max_reso], sorted by aspect ratio."""
    max_units = area // (step * step)
    if max_units < 1 or min_reso > max_reso:
        return []
    side_units = max(1, math.isqrt(max_units))
    sizes = {(side_units * step, side_units * step)}
    width = max(step, math.ceil(min_reso / step) * step)
    while width <= max_reso:
        height = (max_units // (width // step)) * step
        if height >= step:
            sizes.update({(height, width), (width, height)})
        width += step
    kept = [(h, w) for h, w in sizes if min_reso <= h <= max_reso and min_reso <= w <= max_reso]
    return sorted(kept, key=lambda size: (size[1] / size[0], size))


def nearest_bucket(height: int, width: int, buckets: Sequence[BucketSize]) -> BucketSize:
    """The bucket whose aspect ratio (w/h) is nearest the image's; ties go to the larger bucket."""
    ratio = width / height
    return min(buckets, key=lambda size: (abs(size[1] / size[0] - ratio), -size[0] * size[1]))


def assign_buckets(
    image_sizes: Sequence[BucketSize], area: int, min_reso: int, max_reso: int, step: int
) -> list[BucketSize]:
    """The bucket (height, width) of each image of size (height, width)."""
    buckets = bucket_sizes(area, min_reso, max_reso, step)
    return [nearest_bucket(height, width, buckets) for height, width in image_sizes]
