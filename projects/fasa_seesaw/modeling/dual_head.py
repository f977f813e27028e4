# Copyright (c) fasa_seesaw contributors.
"""
The dual-head classification stage (Seesaw supplement 4.2): after a model is trained, a new
classifier is trained beside each box predictor's own (every cascade stage) with everything else
frozen, and inference averages the two classifiers' scores. The predictor holds the second
classifier (``dual_cls_score``, :class:`~.fast_rcnn.LongTailFastRCNNOutputLayers`); this module
freezes the rest and tells its state-dict keys apart.
"""

from typing import Iterable, List

from detectron2.layers import FrozenBatchNorm2d

__all__ = ["DUAL_HEAD_MODULES", "freeze_for_dual_head", "is_dual_head_key", "non_dual_head_keys"]

# The predictor's attributes that the dual-head stage adds (and trains).
DUAL_HEAD_MODULES = ("dual_cls_score", "dual_cls_loss")


def is_dual_head_key(key: str) -> bool:
    """Whether a parameter or state-dict key belongs to a dual-head classifier or its loss."""
    return any(f".{m}." in f".{key}" for m in DUAL_HEAD_MODULES)


def non_dual_head_keys(keys: Iterable[str]) -> List[str]:
    return [k for k in keys if not is_dual_head_key(k)]


def freeze_for_dual_head(model):
    """
    Freeze every part of ``model`` but the dual-head classifiers: their parameters alone keep
    ``requires_grad``, BatchNorm layers become FrozenBatchNorm2d (training mode would update
    their running statistics), and the ROI heads run their mask head only at test (its loss would
    train nothing). Returns the model (its BatchNorm children replaced in place).
    """
    FrozenBatchNorm2d.convert_frozen_batchnorm(model)
    for name, param in model.named_parameters():
        param.requires_grad_(is_dual_head_key(name))
    heads = getattr(model, "roi_heads", None)
    if heads is not None and getattr(heads, "mask_on", False):
        # Hooks rather than overrides of the heads' methods, which must stay scriptable. Only
        # training forwards are touched, and mask_on is restored after each (also on an error),
        # so inference (test-time augmentation switching masks off included) is as it was.
        heads.register_forward_pre_hook(_no_masks_in_training)
        heads.register_forward_hook(_restore_masks, always_call=True)
    return model


_SAVED = "_dual_head_saved_mask_on"


def _no_masks_in_training(roi_heads, _inputs):
    if roi_heads.training:
        setattr(roi_heads, _SAVED, roi_heads.mask_on)
        roi_heads.mask_on = False


def _restore_masks(roi_heads, _inputs, _output):
    saved = roi_heads.__dict__.pop(_SAVED, None)
    if saved is not None:
        roi_heads.mask_on = saved
