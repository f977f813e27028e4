# Copyright (c) fasa_seesaw contributors.
"""
Test-time augmentation (TEST.AUG.*) through detectron2's GeneralizedRCNNWithTTA: every
augmented image (each of TEST.AUG.MIN_SIZES, and its horizontal flip with TEST.AUG.FLIP) runs the
model's own inference, so any predictor the project builds (CE, Seesaw's C+2 scores, FASA,
cascades with either score average, per-stage mask heads, the normed mask head) works unchanged;
the detections of all augmentations are merged by class-wise NMS and each merged box's mask is the
mean of its masks predicted on every augmented image (detectron2's rule).

Two things differ from detectron2's train_net examples: the images enter at their original size
(:func:`tta_test_mapper`), so each scale is resized from the original pixels rather than from the
TEST-size image; and the resize follows INPUT.RESIZE_BACKEND.
"""

import copy
import numpy as np
import torch
from fvcore.transforms import NoOpTransform

from detectron2.data.transforms import RandomFlip, ResizeTransform, apply_augmentations
from detectron2.modeling import (
    META_ARCH_REGISTRY,
    DatasetMapperTTA,
    GeneralizedRCNN,
    GeneralizedRCNNWithTTA,
)

from ..data.resize import ResizeShortestEdgeCV2, build_mapper
from ..errors import ConfigError, registered_subclass

__all__ = ["build_tta_model", "check_tta", "tta_test_mapper"]


def check_tta(cfg) -> None:
    """TEST.AUG settings that would fail deep inside inference, as one ConfigError each."""
    aug = cfg.TEST.AUG
    if not aug.ENABLED:
        return
    sizes = list(aug.MIN_SIZES)
    if not sizes or any(not isinstance(s, int) or s <= 0 for s in sizes):
        raise ConfigError(
            f"TEST.AUG.MIN_SIZES is {tuple(sizes)}; test-time augmentation needs at least one "
            "positive short-side size (the Seesaw entry: (1200, 1400, 1600, 1800, 2000))."
        )
    if aug.MAX_SIZE <= 0:
        raise ConfigError(f"TEST.AUG.MAX_SIZE is {aug.MAX_SIZE}; it must be a positive size.")
    arch = cfg.MODEL.META_ARCHITECTURE
    if not registered_subclass(META_ARCH_REGISTRY, arch, GeneralizedRCNN):
        raise ConfigError(
            f"TEST.AUG.ENABLED: detectron2's test-time augmentation runs GeneralizedRCNN models "
            "(and subclasses such as GlobalContextRCNN); "
            f"MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r}."
        )
    if cfg.MODEL.KEYPOINT_ON or cfg.MODEL.LOAD_PROPOSALS:
        raise ConfigError(
            "TEST.AUG.ENABLED: detectron2's test-time augmentation supports neither keypoints "
            "nor precomputed proposals; set MODEL.KEYPOINT_ON / MODEL.LOAD_PROPOSALS False."
        )
    if cfg.TEST.LVIS.TOPK_PER_CLASS > 0:
        raise ConfigError(
            "TEST.AUG.ENABLED cannot be combined with TEST.LVIS.TOPK_PER_CLASS: the merge of the "
            "augmentations keeps TEST.DETECTIONS_PER_IMAGE per image. Evaluate AP-Fixed without "
            "test-time augmentation, or set TEST.LVIS.TOPK_PER_CLASS 0."
        )


class _CV2DatasetMapperTTA(DatasetMapperTTA):
    """detectron2's DatasetMapperTTA with mmdetection's resize (INPUT.RESIZE_BACKEND cv2)."""

    def __call__(self, dataset_dict):
        image = dataset_dict["image"].permute(1, 2, 0).numpy()
        orig_shape = (dataset_dict["height"], dataset_dict["width"])
        pre_tfm = NoOpTransform()
        if image.shape[:2] != orig_shape:
            pre_tfm = ResizeTransform(*orig_shape, *image.shape[:2])
        ret = []
        for min_size in self.min_sizes:
            resize = ResizeShortestEdgeCV2(min_size, self.max_size)
            for augs in [[resize]] + ([[resize, RandomFlip(prob=1.0)]] if self.flip else []):
                new_image, tfms = apply_augmentations(augs, np.copy(image))
                dic = copy.deepcopy(dataset_dict)
                dic["transforms"] = pre_tfm + tfms
                dic["image"] = torch.from_numpy(np.ascontiguousarray(new_image.transpose(2, 0, 1)))
                ret.append(dic)
        return ret


def tta_test_mapper(cfg):
    """The test loader's mapper for TTA: images at their original size (no resize), so every
    augmentation resizes the original pixels."""
    return build_mapper(cfg, False, augmentations=[])


def build_tta_model(cfg, model) -> GeneralizedRCNNWithTTA:
    """``model`` wrapped for test-time augmentation as TEST.AUG says."""
    check_tta(cfg)
    if cfg.INPUT.RESIZE_BACKEND == "cv2":
        mapper = _CV2DatasetMapperTTA(cfg)
    else:
        mapper = DatasetMapperTTA(cfg)
    # One augmented image per inference call: at the LVIS scales (up to 2000 x 3333) three at
    # once, detectron2's default, can exhaust a GPU's memory.
    return GeneralizedRCNNWithTTA(cfg, model, tta_mapper=mapper, batch_size=1)
