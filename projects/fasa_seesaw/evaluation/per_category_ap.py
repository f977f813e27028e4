# Copyright (c) fasa_seesaw contributors.
"""Per-category LVIS AP on a subset of a dataset's images (FASA's metric adaptation signal)."""

import itertools
import logging
import numpy as np

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils import comm

from .lvis_engines import evaluate_lvis
from .results import EmptyResultsError, load_lvis_gt

__all__ = ["per_category_ap", "PerCategoryAPEvaluator"]

logger = logging.getLogger(__name__)


def per_category_ap(gt, results, image_ids, iou_type="bbox", max_dets=300, engine="hotcoco"):
    """
    AP of each category (ordered by category id; fraction) over ``image_ids`` only: the mean of
    the LVIS precision array over IoU thresholds and recall points, area "all"; NaN where a
    category has no ground truth there.

    Args:
        gt: the LVIS json as a dict (or an ``lvis.LVIS`` object).
        results: LVIS-format detections (category ids as in the json).
        image_ids: the images evaluated; restricting them matters when the json holds more
            images than were run (a held-out part of train).
        engine: "hotcoco" (fast) or "lvis" (lvis-api); they give the same numbers.
    """
    if hasattr(gt, "dataset"):
        gt = gt.dataset
    cat_ids = sorted(c["id"] for c in gt["categories"])
    try:
        out = evaluate_lvis(gt, results, iou_type, engine, max_dets=max_dets, img_ids=image_ids)
    except EmptyResultsError:
        return np.full(len(cat_ids), np.nan)
    return out.per_category_ap / 100.0


class PerCategoryAPEvaluator(DatasetEvaluator):
    """Box AP per category over the images it is shown; the LVIS json is read once."""

    def __init__(self, dataset_name, max_dets=300):
        self._meta = MetadataCatalog.get(dataset_name)
        self._max_dets = max_dets
        self._lvis = None

    def reset(self):
        self._results, self._image_ids = [], []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            self._image_ids.append(inp["image_id"])
            if "instances" in out:
                instances = out["instances"].to("cpu")
                if instances.has("pred_masks"):
                    instances.remove("pred_masks")  # boxes are enough for the signal
                self._results.extend(instances_to_coco_json(instances, inp["image_id"]))

    def evaluate(self):
        results = list(itertools.chain(*comm.gather(self._results, dst=0)))
        image_ids = list(itertools.chain(*comm.gather(self._image_ids, dst=0)))
        if not comm.is_main_process():
            return {}
        if self._lvis is None:
            self._lvis = load_lvis_gt(self._meta.json_file)
        for r in results:
            r["category_id"] += 1  # contiguous -> LVIS ids (1..K)
        ap = per_category_ap(self._lvis, results, image_ids, "bbox", self._max_dets)
        return {"per_category_ap": ap}
