# Copyright (c) fasa_seesaw contributors.
"""Seesaw Loss and FASA for long-tailed instance segmentation in detectron2."""

from . import data, modeling  # noqa: F401  (registers datasets, ROI heads and mask heads)
from .pretrained_url import register_handler as _register_pretrained_handler
from .config import add_fasa_seesaw_config
from .errors import ConfigError

__version__ = "0.1.0"

# MODEL.WEIGHTS "fasa_seesaw://pretrained/<name>.pth": the synthetic-pretrained backbones.
_register_pretrained_handler()
