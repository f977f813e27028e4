# Copyright (c) fasa_seesaw contributors.
"""Checkpoints of the official codebases, converted to this project's detectron2 models."""

from .mmdet import (
    ConversionError,
    checkpoint_classes,
    check_class_order,
    convert_state_dict,
    lvis_v1_names,
    mmdet_key_to_detectron2,
)

__all__ = [
    "ConversionError",
    "checkpoint_classes",
    "check_class_order",
    "convert_state_dict",
    "lvis_v1_names",
    "mmdet_key_to_detectron2",
]
