# Copyright (c) fasa_seesaw contributors.
"""
Caps on detections, as the LVIS protocols define them: per image (lvis-api's 300, applied by
every engine before matching) and per class over the dataset (AP-Fixed and AP-Pool's K). Both
take a list of result dicts or the (N, 7) box array that
:func:`~fasa_seesaw.evaluation.results.prepare_results` returns, and break score ties by position
(a stable sort), so equal scores keep results-file order.
"""

import numpy as np
from collections import defaultdict
from typing import List

__all__ = ["top_rows_per_group", "cap_per_image", "cap_per_class"]


def top_rows_per_group(arr: np.ndarray, group_col: int, k: int) -> np.ndarray:
    """
    Boolean mask of the rows of ``arr`` (hotcoco layout, score in column 5) that rank among the
    ``k`` highest scores of their group (rows with equal ``arr[:, group_col]``), ties broken by
    position, as a stable sort does. Kept rows stay in their original order.
    """
    order = np.lexsort((np.arange(len(arr)), -arr[:, 5], arr[:, group_col]))
    groups = arr[order, group_col]
    starts = np.r_[0, np.flatnonzero(np.diff(groups)) + 1]
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    keep = np.zeros(len(arr), dtype=bool)
    keep[order[rank < k]] = True
    return keep


def cap_per_image(results, max_dets: int):
    """
    lvis-api's ``LVISResults.limit_dets_per_image``: group by image (in order of first
    appearance); an image with more than ``max_dets`` detections keeps its ``max_dets``
    highest-scoring ones (stable sort: equal scores keep results-file order). ``max_dets < 0``
    keeps everything.
    """
    if max_dets is None or max_dets < 0:
        return results if isinstance(results, np.ndarray) else list(results)
    if isinstance(results, np.ndarray):
        return results[top_rows_per_group(results, 0, max_dets)]
    per_img = defaultdict(list)
    for r in results:
        per_img[r["image_id"]].append(r)
    out = []
    for anns in per_img.values():
        if len(anns) > max_dets:
            anns = sorted(anns, key=lambda a: a["score"], reverse=True)[:max_dets]
        out.extend(anns)
    return out


def cap_per_class(results: List[dict], k: int = 10000):
    """
    The ``k`` highest-scoring detections of every class over the dataset (stable: equal scores
    keep results-file order). Returns (capped results, {category_id: count} of the classes with
    fewer than ``k``).
    """
    if isinstance(results, np.ndarray):
        keep = top_rows_per_group(results, 6, k)
        cats, counts = np.unique(results[keep, 6].astype(np.int64), return_counts=True)
        return results[keep], {int(c): int(n) for c, n in zip(cats, counts) if n < k}
    per_cat = defaultdict(list)
    for r in results:
        per_cat[r["category_id"]].append(r)
    out, short = [], {}
    for cat, anns in per_cat.items():
        anns = sorted(anns, key=lambda a: a["score"], reverse=True)[:k]
        if len(anns) < k:
            short[cat] = len(anns)
        out.extend(anns)
    return out, short
