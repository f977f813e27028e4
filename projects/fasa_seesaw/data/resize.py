# Copyright (c) fasa_seesaw contributors.
"""
The image resize of the data mappers: detectron2's (PIL bilinear, antialiased when shrinking)
or mmdetection's (OpenCV bilinear, ``mmcv.imresize``), chosen by ``INPUT.RESIZE_BACKEND``.

With "cv2" the output size is mmdetection's ``Resize(scale=(1333, 800), keep_ratio=True)``
(mmcv's rescale_size): scale = min(max / long side, short / short side), each side
int(side * scale + 0.5). detectron2's rule computes the same scale in another order and lands one
pixel off for some shapes when the long-side cap applies (302 x 151: 666 x 1333 against mmcv's
667 x 1333). Checkpoints converted from mmdetection see the pixels they were trained on with "cv2".
"""

import numpy as np
from typing import List, Optional
import cv2

from detectron2.data import DatasetMapper
from detectron2.data import transforms as T

from ..errors import ConfigError

__all__ = [
    "RESIZE_BACKENDS",
    "CV2ResizeTransform",
    "ResizeShortestEdgeCV2",
    "build_mapper",
    "mmcv_size",
]

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


def mmcv_size(h: int, w: int, short: float, long: float):
    """mmcv's rescale_size with keep_ratio (mmdetection's Resize): one scale,
    min(long / long side, short / short side), each side rounded half up. detectron2's rule
    scales in another order and can land one pixel off when the long-side cap applies."""
    scale = min(long / max(h, w), short / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


class ResizeShortestEdgeCV2(T.ResizeShortestEdge):
    """ResizeShortestEdge (the same random draws) as mmdetection's Resize: mmcv's sizes,
    OpenCV's bilinear."""

    def get_transform(self, image):
        h, w = image.shape[:2]
        if self.is_range:
            size = np.random.randint(self.short_edge_length[0], self.short_edge_length[1] + 1)
        else:
            size = np.random.choice(self.short_edge_length)
        if size == 0:
            return T.NoOpTransform()
        new_h, new_w = mmcv_size(h, w, size, self.max_size)
        return CV2ResizeTransform(h, w, new_h, new_w)


def _with_backend(augmentations: List, backend: str) -> List:
    if backend == "pil":
        return list(augmentations)
    out = []
    for aug in augmentations:
        if type(aug) is T.ResizeShortestEdge:
            aug = ResizeShortestEdgeCV2(
                aug.short_edge_length, aug.max_size, "range" if aug.is_range else "choice"
            )
        elif isinstance(aug, (T.ResizeShortestEdge, T.Resize, T.ResizeScale)):
            raise ConfigError(
                f"INPUT.RESIZE_BACKEND cv2 replaces detectron2's ResizeShortestEdge only; the "
                f"mapper also has {type(aug).__name__}, which would still resize with PIL. Use "
                "INPUT.RESIZE_BACKEND pil with it."
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
