# Copyright (c) fasa_seesaw contributors.
"""Statistics of registered training datasets that models need (never hard-coded per dataset)."""

import functools
import math
import numpy as np
from typing import Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = [
    "COMMON_MAX_IMAGES",
    "FREQUENCY_GROUPS",
    "RARE_MAX_IMAGES",
    "class_frequency",
    "epoch_iterations",
    "image_counts_of",
    "image_frequency_of",
    "instance_counts_of",
    "lvis_frequency",
]

# LVIS v1 thresholds on the number of TRAINING images containing a class.
RARE_MAX_IMAGES = 10
COMMON_MAX_IMAGES = 100
FREQUENCY_GROUPS = ("r", "c", "f")


def lvis_frequency(image_counts) -> np.ndarray:
    """Maps training image counts to LVIS frequency groups (r: <=10, c: 11..100, f: >100)."""
    counts = np.asarray(image_counts)
    return np.where(
        counts <= RARE_MAX_IMAGES, "r", np.where(counts <= COMMON_MAX_IMAGES, "c", "f")
    ).astype("<U1")


@functools.lru_cache(maxsize=16)
def _summary(name: str, num_classes: int) -> Tuple[int, np.ndarray, np.ndarray, int]:
    """(number of images, per-class instance counts, per-class image counts, number of images
    with at least one annotation); cached, since LVIS train takes a while to load and FASA's
    initial probabilities, its epoch length, EQL's class frequencies and the gradient
    statistics' category table need it."""
    dicts = DatasetCatalog.get(name)
    ids = np.asarray(
        [a["category_id"] for d in dicts for a in d.get("annotations", ())], dtype=np.int64
    )
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        raise ValueError(
            f"Dataset '{name}' has class ids outside [0, {num_classes}); "
            "MODEL.ROI_HEADS.NUM_CLASSES must match the dataset."
        )
    counts = np.bincount(ids, minlength=num_classes) if ids.size else np.zeros(num_classes, int)
    counts.setflags(write=False)
    # Each class once per image, however many instances it has there.
    img = np.asarray(
        [i for i, d in enumerate(dicts) for _ in d.get("annotations", ())], dtype=np.int64
    )
    pairs = np.unique(img * num_classes + ids)
    per_image = np.bincount(pairs % num_classes, minlength=num_classes).astype(np.int64)
    per_image.setflags(write=False)
    annotated = sum(1 for d in dicts if d.get("annotations"))
    return len(dicts), counts, per_image, annotated


def instance_counts_of(dataset_names: Sequence[str], num_classes: int) -> np.ndarray:
    """Per-class number of annotated instances over the datasets (contiguous class ids)."""
    return sum(_summary(name, num_classes)[1] for name in dataset_names).astype(np.int64)


def image_counts_of(dataset_names: Sequence[str], num_classes: int) -> np.ndarray:
    """Per-class number of images with at least one instance of the class (LVIS's image_count,
    which defines the r/c/f groups), over the datasets."""
    return sum(_summary(name, num_classes)[2] for name in dataset_names).astype(np.int64)


def image_frequency_of(dataset_names: Sequence[str], num_classes: int) -> np.ndarray:
    """
    Per-class image frequency: the images that contain the class over the images that contain
    any annotation (EQL's f_j; its official code divides LVIS's image_count by the number of
    distinct image ids among the annotations). float64, over all the datasets together.
    """
    annotated = sum(_summary(name, num_classes)[3] for name in dataset_names)
    return image_counts_of(dataset_names, num_classes) / max(annotated, 1)


def epoch_iterations(dataset_names: Sequence[str], ims_per_batch: int, num_classes: int) -> int:
    """Iterations in one pass over the training images at the given global batch size."""
    total = sum(_summary(name, num_classes)[0] for name in dataset_names)
    return max(1, math.ceil(total / ims_per_batch))


def class_frequency(dataset_names: Sequence[str], num_classes: int) -> np.ndarray:
    """
    LVIS frequency group ("r", "c" or "f") per contiguous class id of the training datasets: the
    first dataset's ``thing_frequency`` metadata, else the groups of its ``class_image_count``
    (detectron2's LVIS v1 metadata), else of the image counts of all the datasets (loads them).
    """
    meta = MetadataCatalog.get(dataset_names[0])
    frequency = meta.get("thing_frequency", None)
    if frequency is not None and len(frequency) == num_classes:
        return np.asarray(frequency).astype("<U1")
    image_counts = meta.get("class_image_count", None)
    if image_counts is not None and len(image_counts) == num_classes:
        counts = [c["image_count"] for c in sorted(image_counts, key=lambda c: c["id"])]
    else:
        counts = image_counts_of(tuple(dataset_names), num_classes)
    return lvis_frequency(counts)
