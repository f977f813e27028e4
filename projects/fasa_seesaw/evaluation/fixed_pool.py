# Copyright (c) fasa_seesaw contributors.
"""
AP-Fixed and AP-Pool (Dave, Dollar, Ramanan, Kirillov, Girshick, "Evaluating Large-Vocabulary
Object Detectors: The Devil is in the Details", 2021), as their reference code defines them.

AP-Fixed: keep the K highest-scoring detections of every class over the whole dataset (K =
10,000 for LVIS; equal scores keep results-file order), put no cap on detections per image, then
run the standard LVIS evaluation. Classes with fewer than K detections are evaluated as they are
(their AP-Fixed is artificially low; a warning says how many).

AP-Pool: the same per-class cap and no per-image cap; matching is LVIS's, per image and
category (federated rules included), on area "all". Then, per pool of categories (all, and the
r, c, f groups separately), the detections of all its categories are ranked together by score
(stable sort over images in id order and categories in id order) and one precision/recall curve
is built from them: a detection is a true positive when matched and not ignored, a false
positive when unmatched and not ignored; the number of positives is every non-ignored ground
truth of the pool. Precision is interpolated (running maximum from the right) and read at the
101 recall points, then averaged over them and the 10 IoU thresholds. A pool with a single
category gives that category's LVIS AP.
"""

import logging
import numpy as np
from typing import Dict, Optional, Sequence

from .caps import cap_per_class
from .lvis_engines import METRIC_KEYS, evaluate_lvis
from .results import EvaluationInputError, load_lvis_gt, prepare_results

__all__ = ["ap_fixed", "ap_pool", "pooled_ap_from_eval_imgs"]

logger = logging.getLogger(__name__)

REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)


def _num_categories(results) -> int:
    if isinstance(results, np.ndarray):
        return int(np.unique(results[:, 6]).size)
    return len({r["category_id"] for r in results})


def _warn_short(short: Dict[int, int], num_cats: int, k: int):
    if short:
        logger.warning(
            f"AP-Fixed/AP-Pool: {len(short)} of {num_cats} classes with detections have fewer than "
            f"K={k} (e.g. category {next(iter(short))}: {next(iter(short.values()))}); their "
            "AP-Fixed is lower than the model could reach. Run inference with the top-K-per-class "
            "mode (TEST.LVIS.TOPK_PER_CLASS) to produce up to K per class."
        )


def capped_per_class(gt, results, iou_type, k, img_ids=None, prepared=False):
    """
    (gt, results capped to the top ``k`` per class, {category: count} of classes below ``k``):
    the input both AP-Fixed and AP-Pool evaluate; the fewer-than-K warning is logged here, once.
    """
    if k <= 0:
        raise EvaluationInputError(f"K of AP-Fixed/AP-Pool must be positive, not {k}.")
    if not prepared:
        gt = load_lvis_gt(gt)
        results = prepare_results(gt, results, iou_type, img_ids)
    capped, short = cap_per_class(results, k)
    _warn_short(short, _num_categories(results), k)
    return gt, capped, short


def fixed_metrics(gt, capped, short, iou_type, engine="hotcoco", img_ids=None) -> dict:
    """AP-Fixed metrics from the output of :func:`capped_per_class`."""
    out = evaluate_lvis(gt, capped, iou_type, engine, max_dets=-1, img_ids=img_ids, prepared=True)
    metrics = {f"{key}_fixed": out.metrics[key] for key in METRIC_KEYS}
    metrics["classes_below_K"] = len(short)
    return metrics


def ap_fixed(
    gt,
    results,
    iou_type: str = "bbox",
    k: int = 10000,
    engine: str = "hotcoco",
    img_ids: Optional[Sequence[int]] = None,
    prepared: bool = False,
) -> dict:
    """AP-Fixed: top ``k`` per class over the dataset, no per-image cap, standard LVIS AP.
    ``prepared``: ``gt`` and ``results`` came from load_lvis_gt / prepare_results."""
    gt, capped, short = capped_per_class(gt, results, iou_type, k, img_ids, prepared)
    return fixed_metrics(gt, capped, short, iou_type, engine, img_ids)


def pooled_ap_from_eval_imgs(
    eval_imgs: list,
    img_ids: Sequence[int],
    pool_cat_ids: Sequence[int],
) -> float:
    """
    Pooled AP (fraction, -1 when the pool has no ground truth) of the categories in
    ``pool_cat_ids`` from per-(image, category) matching results of one area range (the layout
    of :class:`LVISEvalOutput.eval_imgs`).
    """
    areas = {tuple(e["area_rng"]) for e in eval_imgs}
    if len(areas) > 1:
        raise ValueError(f"pooled AP needs one area range; eval_imgs hold {len(areas)}.")
    by_key = {(e["image_id"], e["category_id"]): e for e in eval_imgs}
    pool = sorted({int(c) for c in pool_cat_ids})
    entries = [
        by_key[(i, c)] for i in sorted({int(i) for i in img_ids}) for c in pool if (i, c) in by_key
    ]
    if not entries:
        return -1.0
    gt_ig = np.concatenate([e["gt_ignore"] for e in entries]) if entries else np.zeros(0, bool)
    npig = int(np.count_nonzero(~gt_ig))
    if npig == 0:
        return -1.0
    scores = np.concatenate([e["dt_scores"] for e in entries])
    num_thrs = max(e["dt_matches"].shape[0] for e in entries)
    order = np.argsort(-scores, kind="mergesort")
    dt_m = np.concatenate([e["dt_matches"].reshape(num_thrs, -1) for e in entries], axis=1)[
        :, order
    ]
    dt_ig = np.concatenate([e["dt_ignore"].reshape(num_thrs, -1) for e in entries], axis=1)[
        :, order
    ]
    tps = np.logical_and(dt_m != 0, ~dt_ig)
    fps = np.logical_and(dt_m == 0, ~dt_ig)
    tp_sum = np.cumsum(tps, axis=1, dtype=np.float64)
    fp_sum = np.cumsum(fps, axis=1, dtype=np.float64)
    precision = np.zeros((num_thrs, len(REC_THRS)))
    for t in range(num_thrs):
        tp, fp = tp_sum[t], fp_sum[t]
        rc = tp / npig
        pr = tp / (fp + tp + np.spacing(1))
        pr = np.maximum.accumulate(pr[::-1])[::-1] if pr.size else pr
        idx = np.searchsorted(rc, REC_THRS, side="left")
        q = np.zeros(len(REC_THRS))
        ok = idx < pr.size
        q[ok] = pr[idx[ok]]
        # recall points past the highest recall reached stay 0 (as in COCO/LVIS)
        precision[t] = q
    return float(precision.mean())


def pool_metrics(gt, capped, iou_type, engine="hotcoco", img_ids=None) -> dict:
    """AP-Pool metrics (all, r, c, f) from the output of :func:`capped_per_class`."""
    out = evaluate_lvis(
        gt,
        capped,
        iou_type,
        engine,
        max_dets=-1,
        img_ids=img_ids,
        keep_eval_imgs=True,
        area_rng=[[0.0, 1e10]],
        prepared=True,
    )
    freq = {c["id"]: c["frequency"] for c in gt["categories"]}
    pools = {
        "AP_pool": out.cat_ids,
        "AP_pool_r": [c for c in out.cat_ids if freq[c] == "r"],
        "AP_pool_c": [c for c in out.cat_ids if freq[c] == "c"],
        "AP_pool_f": [c for c in out.cat_ids if freq[c] == "f"],
    }
    metrics = {}
    for name, cats in pools.items():
        v = pooled_ap_from_eval_imgs(out.eval_imgs, out.img_ids, cats)
        metrics[name] = float("nan") if v == -1 else v * 100.0
    return metrics


def ap_pool(
    gt,
    results,
    iou_type: str = "bbox",
    k: int = 10000,
    engine: str = "hotcoco",
    img_ids: Optional[Sequence[int]] = None,
    prepared: bool = False,
) -> dict:
    """AP-Pool for all categories and for each of the r, c, f groups (percent; NaN: no GT)."""
    gt, capped, _ = capped_per_class(gt, results, iou_type, k, img_ids, prepared)
    return pool_metrics(gt, capped, iou_type, engine, img_ids)
