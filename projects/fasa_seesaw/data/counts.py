# Copyright (c) fasa_seesaw contributors.
"""Statistics of registered training datasets that models need (never hard-coded per dataset)."""

import math
import numpy as np
from typing import Sequence

from detectron2.data import DatasetCatalog

__all__ = ["instance_counts_of", "epoch_iterations"]


def instance_counts_of(dataset_names: Sequence[str], num_classes: int) -> np.ndarray:
    """Per-class number of annotated instances over the datasets (contiguous class ids)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for name in dataset_names:
        ids = [a["category_id"] for d in DatasetCatalog.get(name) for a in d.get("annotations", ())]
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
            raise ValueError(
                f"Dataset '{name}' has class ids outside [0, {num_classes}); "
                "MODEL.ROI_HEADS.NUM_CLASSES must match the dataset."
            )
        counts += np.bincount(ids, minlength=num_classes)
    return counts


def epoch_iterations(dataset_names: Sequence[str], ims_per_batch: int) -> int:
    """Iterations in one pass over the training images at the given global batch size."""
    total = sum(len(DatasetCatalog.get(name)) for name in dataset_names)
    return max(1, math.ceil(total / ims_per_batch))
