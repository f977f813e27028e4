# Copyright (c) fasa_seesaw contributors.
"""
Everything a long-tail paper reports, from one results list: LVIS AP (all the standard keys),
AP-Fixed, AP-Pool, TIDE errors and per-category AP, written as json, CSV and PNG next to each
other. Used by ``train_net.py``'s evaluator and by ``tools/evaluate_lvis.py``.
"""

import csv
import json
import logging
import math
import os
import sys
from collections import OrderedDict, defaultdict
from typing import Dict, Iterable, List, Optional, Sequence

from .fixed_pool import capped_per_class, fixed_metrics, pool_metrics
from .lvis_engines import evaluate_lvis
from .results import EvaluationInputError, load_lvis_gt, prepare_results
from .tide import tide_errors, tide_from_evaluator

__all__ = [
    "EXTRAS",
    "training_image_counts",
    "write_per_category_csv",
    "evaluate_report",
    "format_table",
    "print_summary",
    "unique_path",
]

logger = logging.getLogger(__name__)

EXTRAS = ("fixed", "pool", "tide")


def training_image_counts(gt: dict, train_json: Optional[str] = None) -> Dict[int, Optional[int]]:
    """
    Number of training images per category id: counted from ``train_json``'s annotations when
    given, else the categories' ``image_count`` field (LVIS jsons carry the training count
    there), else None.
    """
    if train_json:
        with open(train_json, encoding="utf-8") as f:
            train = json.load(f)
        imgs = defaultdict(set)
        for a in train.get("annotations", []):
            imgs[a["category_id"]].add(a["image_id"])
        return {c["id"]: len(imgs.get(c["id"], ())) for c in gt["categories"]}
    return {c["id"]: c.get("image_count") for c in gt["categories"]}


def write_per_category_csv(path, gt: dict, cat_ids, ap, train_images: Dict[int, Optional[int]]):
    """One row per category: id, name, frequency, training images, AP (percent; empty = no GT)."""
    cats = {c["id"]: c for c in gt["categories"]}
    rows = []
    for cid, v in zip(cat_ids, ap):
        c = cats[cid]
        rows.append(
            {
                "category_id": cid,
                "name": c.get("name", str(cid)),
                "frequency": c.get("frequency", ""),
                "train_images": train_images.get(cid),
                "ap": None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v),
            }
        )
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["category_id"])
        w.writeheader()
        for r in rows:
            w.writerow(
                {k: ("" if v is None else (f"{v:.4f}" if k == "ap" else v)) for k, v in r.items()}
            )
    return rows


def unique_path(path: str) -> str:
    """``path`` if free, else ``path`` with .1, .2, ... before the extension (never overwrite)."""
    if not os.path.exists(path):
        return path
    root, ext = os.path.splitext(path)
    i = 1
    while os.path.exists(f"{root}.{i}{ext}"):
        i += 1
    return f"{root}.{i}{ext}"


def _per_category_figure(rows, png, iou_type):
    """The per-category AP PNG; during training also a TensorBoard image."""
    from .figures import figure_to_chw_uint8, per_category_ap_figure, plot_per_category_ap

    rows = [dict(r, ap=float("nan") if r["ap"] is None else r["ap"]) for r in rows]
    title = f"{iou_type} AP per category, sorted by training images"
    plot_per_category_ap(rows, png, title=title)
    try:
        from detectron2.utils.events import get_event_storage

        storage = get_event_storage()
    except AssertionError:  # not inside training (eval-only, the command line)
        return
    storage.put_image(
        f"per_category_ap/{iou_type}", figure_to_chw_uint8(per_category_ap_figure(rows, title))
    )


def evaluate_report(
    gt,
    results: List[dict],
    iou_types: Sequence[str] = ("bbox", "segm"),
    engine: str = "hotcoco",
    max_dets: int = 300,
    extras: Iterable[str] = EXTRAS,
    fixed_k: int = 10000,
    out_dir: Optional[str] = None,
    train_json: Optional[str] = None,
    figures: bool = True,
    img_ids: Optional[Sequence[int]] = None,
    prefix: str = "",
) -> "OrderedDict[str, Dict[str, float]]":
    """
    Evaluate ``results`` for each iou type and return {iou_type: {metric: value}} (percent),
    detectron2's evaluator layout. With ``out_dir``: ``<prefix>lvis_metrics.json``,
    ``<prefix>per_category_ap_<iou>.csv`` and ``<prefix>per_category_ap_<iou>.png``; existing
    files are kept and the new ones get a numbered name.

    Raises:
        EvaluationInputError / EmptyResultsError for unusable inputs (see
        :func:`~fasa_seesaw.evaluation.results.prepare_results`).
    """
    extras = tuple(extras)
    bad = [e for e in extras if e not in EXTRAS]
    if bad:
        raise EvaluationInputError(f"unknown extra metric(s) {bad}; choose from {EXTRAS}.")
    gt = load_lvis_gt(gt)
    train_images = training_image_counts(gt, train_json)
    out = OrderedDict()
    tables = {}
    for iou_type in iou_types:
        prepared = prepare_results(gt, results, iou_type, img_ids)
        std = evaluate_lvis(
            gt, prepared, iou_type, engine, max_dets=max_dets, img_ids=img_ids, prepared=True
        )
        m = OrderedDict(std.metrics)
        if "fixed" in extras or "pool" in extras:  # one top-K cut serves both
            _, capped, short = capped_per_class(
                gt, prepared, iou_type, fixed_k, img_ids, prepared=True
            )
            if "fixed" in extras:
                m.update(fixed_metrics(gt, capped, short, iou_type, engine, img_ids))
            if "pool" in extras:
                m.update(pool_metrics(gt, capped, iou_type, engine, img_ids))
        if "tide" in extras:
            if engine == "hotcoco":  # the standard evaluation already matched everything
                m.update(tide_from_evaluator(std.evaluator))
            else:
                m.update(tide_errors(gt, prepared, iou_type, max_dets, img_ids, prepared=True))
        out[iou_type] = m
        tables[iou_type] = (std.cat_ids, std.per_category_ap)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        path = unique_path(os.path.join(out_dir, f"{prefix}lvis_metrics.json"))
        with open(path, "w", encoding="utf-8") as f:
            json.dump(
                {
                    k: {
                        m: (None if isinstance(v, float) and math.isnan(v) else v)
                        for m, v in d.items()
                    }
                    for k, d in out.items()
                },
                f,
                indent=2,
            )
        for iou_type, (cat_ids, ap) in tables.items():
            csv_path = unique_path(os.path.join(out_dir, f"{prefix}per_category_ap_{iou_type}.csv"))
            rows = write_per_category_csv(csv_path, gt, cat_ids, ap, train_images)
            if figures and rows and all(r["train_images"] is not None for r in rows):
                png = unique_path(os.path.join(out_dir, f"{prefix}per_category_ap_{iou_type}.png"))
                _per_category_figure(rows, png, iou_type)
        logger.info(f"LVIS evaluation written to {out_dir}")
    return out


def format_table(results: Dict[str, Dict[str, float]]) -> str:
    """A compact text table (one line per iou type) of the headline metrics."""
    keys = ["AP", "AP50", "AP75", "APr", "APc", "APf", "AP_fixed", "AP_pool", "TIDE_AP50"]
    lines = []
    for iou_type, m in results.items():
        cells = [f"{k} {m[k]:6.2f}" for k in keys if k in m]
        lines.append(f"  {iou_type:5s} " + "  ".join(cells))
    return "\n".join(lines)


def print_summary(results, stream=None):
    """One readable block with AP, AP50, AP75, APr, APc, APf for boxes and masks, from
    detectron2's results (one dict per task, or one such dict per test dataset)."""
    if not results:
        return
    # DefaultTrainer.test flattens the dict when there is a single test dataset; test-time
    # augmentation adds bbox_TTA / segm_TTA (or <dataset>_TTA) beside the plain results.
    tasks = ("bbox", "segm", "bbox_TTA", "segm_TTA")
    by_dataset = {"": results} if any(t in results for t in tasks) else results
    keys = ("AP", "AP50", "AP75", "APr", "APc", "APf")
    lines = ["", "Summary (LVIS metrics, %):"]
    for name, res in by_dataset.items():
        for task in tasks:
            if task in res:
                row = "  ".join(f"{k} {res[task].get(k, float('nan')):6.2f}" for k in keys)
                lines.append(f"  {name + ' ' if name else ''}{task:4s}  {row}")
    print("\n".join(lines), file=stream or sys.stdout, flush=True)
