# Copyright (c) fasa_seesaw contributors.
"""
The image resize of the data mappers: detectron2's (PIL bilinear, antialiased when shrinking)
or mmdetection's (OpenCV bilinear, ``mmcv.imresize``), chosen by ``INPUT.RESIZE_BACKEND``.

The output size is detectron2's ResizeShortestEdge rule either way, which gives mmdetection's
``Resize(scale=(1333, 800), keep_ratio=True)`` sizes: scale = min(max / long side, short /
short side), each side int(side * scale + 0.5). Checkpoints converted from mmdetection see the
pixels they were trained on with "cv2".
"""

import numpy as np
from typing import List, Optional
import cv2

from detectron2.data import DatasetMapper
from detectron2.data import transforms as T

__all__ = ["RESIZE_BACKENDS", "CV2ResizeTransform", "ResizeShortestEdgeCV2", "build_mapper"]

RESIZE_BACKENDS = ("pil", "cv2")


class CV2ResizeTransform(T.ResizeTransform):
    """detectron2's ResizeTransform with OpenCV's bilinear (images) and nearest (masks)."""

    def apply_image(self, img, interp=None):
        assert img.shape[:2] == (self.h, self.w)
        mode = cv2.INTER_NEAREST if interp == "nearest" else cv2.INTER_LINEAR
        out = cv2.resize(np.ascontiguousarray(img), (self.new_w, self.new_h), interpolation=mode)
        if img.ndim == 3 and out.ndim == 2:  # OpenCV drops a single channel
            out = out[:, :, None]
        return out

    def apply_segmentation(self, segmentation):
        return self.apply_image(segmentation, interp="nearest")

    def inverse(self):
        return CV2ResizeTransform(self.new_h, self.new_w, self.h, self.w)


class ResizeShortestEdgeCV2(T.ResizeShortestEdge):
    """ResizeShortestEdge (the same sizes and draws) resizing with OpenCV."""

    def get_transform(self, image):
        t = super().get_transform(image)
        if isinstance(t, T.ResizeTransform):
            return CV2ResizeTransform(t.h, t.w, t.new_h, t.new_w)
        return t


def _with_backend(augmentations: List, backend: str) -> List:
    if backend == "pil":
        return list(augmentations)
    out = []
    for aug in augmentations:
        if type(aug) is T.ResizeShortestEdge:
            aug = ResizeShortestEdgeCV2(
                aug.short_edge_length, aug.max_size, "range" if aug.is_range else "choice"
            )
        out.append(aug)
    return out


def build_mapper(cfg, is_train: bool, augmentations: Optional[List] = None) -> DatasetMapper:
    """detectron2's DatasetMapper for ``cfg`` (with ``augmentations`` instead of the config's,
    if given), its resizes done by INPUT.RESIZE_BACKEND."""
    kwargs = DatasetMapper.from_config(cfg, is_train)
    if augmentations is not None:
        kwargs["augmentations"] = augmentations
    kwargs["augmentations"] = _with_backend(kwargs["augmentations"], cfg.INPUT.RESIZE_BACKEND)
    return DatasetMapper(**kwargs)
