# Copyright (c) fasa_seesaw contributors.
"""
Inference that yields up to K detections per class over a dataset (for AP-Fixed / AP-Pool),
without keeping more than K per class in memory.

Standard inference keeps the top 100-300 detections per image, so rare classes rarely reach
K = 10,000 over the dataset and their AP-Fixed is artificially low. In this mode detectron2's
per-image cap is lifted, and each class's score must exceed a floor: the score of the K-th best
result that class has collected so far (``TopKPerClass.score_floor``, updated as images are
processed). Anything below the floor could never enter that class's top K, so it is dropped
before NMS; since class-wise NMS only lets a box suppress lower-scoring boxes of its class,
dropping them changes nothing above the floor. This is the approach of Dave et al.'s reference
(per-class thresholds tracking the K-th score), done as one pass. The floor is applied by the
box predictor's ``inference`` (:meth:`LongTailFastRCNNOutputLayers.score_floor`), and by the
cascade head on its stage-averaged scores; nothing outside the model changes.
"""

import contextlib
from typing import Callable
import torch

from ..modeling.fast_rcnn import box_predictors

__all__ = ["per_class_score_floor"]


@contextlib.contextmanager
def per_class_score_floor(model, floor_fn: Callable[[int], torch.Tensor], max_per_image: int = -1):
    """
    While active, the box inference of ``model`` replaces its per-image cap
    (TEST.DETECTIONS_PER_IMAGE) by ``max_per_image`` (-1: none) and drops class-c scores at or
    below ``floor_fn(C)[c]``; the usual score threshold (MODEL.ROI_HEADS.SCORE_THRESH_TEST)
    still applies. A finite ``max_per_image`` bounds the mask head's memory (it predicts
    N x classes x 28 x 28 logits for N detections) on the first images, before the floors rise.
    """
    with contextlib.ExitStack() as stack:
        for p in box_predictors(model, required_by="TEST.LVIS.TOPK_PER_CLASS"):
            stack.enter_context(p.score_floor(floor_fn, max_per_image))
        yield
