# Copyright (c) fasa_seesaw contributors.
"""
Per-category tables: category id, name, r/c/f frequency and training images per contiguous class
id, from a dataset's metadata (:func:`category_table`), and the ``grad_stats.csv`` files that
:class:`~fasa_seesaw.engine.grad_stats.GradientStatsHook` writes with the cumulative positive and
negative classification gradients of each category and their ratio (Seesaw supplement,
Figure A1), read back by ``tools/plot_grad_ratio.py``.
"""

import csv
import logging
import numpy as np
from typing import Dict, List, Optional

from detectron2.data import MetadataCatalog

__all__ = [
    "CSV_FIELDS",
    "category_table",
    "index_table",
    "grad_ratio",
    "read_grad_stats_csv",
    "write_grad_stats_csv",
]

logger = logging.getLogger(__name__)

CSV_FIELDS = ("category_id", "name", "frequency", "train_images", "pos", "neg", "ratio")


def grad_ratio(pos, neg) -> np.ndarray:
    """pos / neg per class; NaN where a class received no negative gradient."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(neg > 0, pos / np.where(neg > 0, neg, 1.0), np.nan)


def category_table(
    dataset_name: str, num_classes: int, train_datasets: Optional[List[str]] = None
) -> Dict[str, list]:
    """
    category_id, name, frequency and train_images (training images containing the class) per
    contiguous class id, from the dataset's metadata: ``class_image_count`` (set by this
    project's LVIS registration and detectron2's LVIS v1) gives ids and image counts without
    loading the data; otherwise the images are counted in ``train_datasets``. ``thing_frequency``
    gives r/c/f, else the LVIS thresholds are applied to the counts.
    """
    from ..data.counts import image_counts_of, lvis_frequency

    meta = MetadataCatalog.get(dataset_name)
    names = list(meta.get("thing_classes", None) or [])
    if len(names) != num_classes:
        logger.warning(
            "'%s' has %d class names for %d classes; naming them by index",
            dataset_name,
            len(names),
            num_classes,
        )
        names = [str(i) for i in range(num_classes)]
    image_counts = meta.get("class_image_count", None)
    if image_counts is not None and len(image_counts) == num_classes:
        image_counts = sorted(image_counts, key=lambda c: c["id"])
        ids = [int(c["id"]) for c in image_counts]
        train_images = np.asarray([c["image_count"] for c in image_counts], dtype=np.int64)
    else:
        train_images = image_counts_of(tuple(train_datasets or [dataset_name]), num_classes)
        id_map = meta.get("thing_dataset_id_to_contiguous_id", None) or {}
        by_contiguous = {v: k for k, v in id_map.items()}
        ids = [int(by_contiguous.get(i, i)) for i in range(num_classes)]
    frequency = meta.get("thing_frequency", None)
    if frequency is None or len(frequency) != num_classes:
        frequency = lvis_frequency(train_images)
    return {
        "category_id": ids,
        "name": names,
        "frequency": [str(f) for f in frequency],
        "train_images": [int(n) for n in train_images],
    }


def index_table(num_classes: int) -> Dict[str, list]:
    """The layout of :func:`category_table` without metadata: classes named by index."""
    return {
        "category_id": list(range(num_classes)),
        "name": [str(i) for i in range(num_classes)],
        "frequency": ["?"] * num_classes,
        "train_images": [0] * num_classes,
    }


def write_grad_stats_csv(path: str, table: Dict[str, list], pos, neg) -> str:
    """One row per category: the table's columns, pos, neg and their ratio (empty if NaN)."""
    ratio = grad_ratio(pos, neg)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for i in range(len(ratio)):
            w.writerow(
                [
                    table["category_id"][i],
                    table["name"][i],
                    table["frequency"][i],
                    table["train_images"][i],
                    repr(float(pos[i])),
                    repr(float(neg[i])),
                    "" if np.isnan(ratio[i]) else repr(float(ratio[i])),
                ]
            )
    return path


def read_grad_stats_csv(path: str) -> Dict[str, np.ndarray]:
    """The columns of a grad_stats.csv as arrays (ratio recomputed from pos and neg)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = [k for k in CSV_FIELDS if rows and k not in rows[0]]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing}; is it a grad_stats.csv?")
    out = {
        "category_id": np.asarray([int(r["category_id"]) for r in rows], dtype=np.int64),
        "name": np.asarray([r["name"] for r in rows], dtype=object),
        "frequency": np.asarray([r["frequency"] for r in rows], dtype=object),
        "train_images": np.asarray([int(r["train_images"]) for r in rows], dtype=np.int64),
        "pos": np.asarray([float(r["pos"]) for r in rows], dtype=np.float64),
        "neg": np.asarray([float(r["neg"]) for r in rows], dtype=np.float64),
    }
    out["ratio"] = grad_ratio(out["pos"], out["neg"])
    return out
