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
(per-class thresholds tracking the K-th score), done as one pass. Both Mask R-CNN and Cascade
R-CNN go through detectron2's ``fast_rcnn_inference_single_image``, which is what is wrapped.
"""

import contextlib
import threading
from typing import Callable
import torch

from detectron2.modeling.roi_heads import fast_rcnn

__all__ = ["per_class_score_floor"]

_lock = threading.RLock()  # process-wide: the patched function is module state


@contextlib.contextmanager
def per_class_score_floor(floor_fn: Callable[[int], torch.Tensor], max_per_image: int = -1):
    """
    While active, detectron2's box inference (in this process) replaces its per-image cap
    (TEST.DETECTIONS_PER_IMAGE) by ``max_per_image`` (-1: none) and drops class-c scores at or
    below ``floor_fn(C)[c]``; the usual score threshold (MODEL.ROI_HEADS.SCORE_THRESH_TEST)
    still applies. A finite ``max_per_image`` bounds the mask head's memory (it predicts
    N x classes x 28 x 28 logits for N detections) on the first images, before the floors rise.
    """
    original = fast_rcnn.fast_rcnn_inference_single_image

    def inference_single_image(boxes, scores, image_shape, score_thresh, nms_thresh, topk):
        num_classes = scores.shape[1] - 1
        floor = floor_fn(num_classes).to(device=scores.device, dtype=scores.dtype)
        scores = scores.clone()
        fg = scores[:, :num_classes]
        fg[fg <= floor[None, :]] = 0.0  # <= score_thresh (>= 0): filtered out
        return original(boxes, scores, image_shape, score_thresh, nms_thresh, max_per_image)

    with _lock:
        fast_rcnn.fast_rcnn_inference_single_image = inference_single_image
        try:
            yield
        finally:
            fast_rcnn.fast_rcnn_inference_single_image = original
