# Copyright (c) fasa_seesaw contributors.
from . import normed_mask_head, roi_heads  # noqa: F401  (registration)
from .normed_layers import NormedConv2d, NormedLinear
from .normed_mask_head import NormedMaskRCNNConvUpsampleHead
from .roi_heads import SeesawCascadeROIHeads, SeesawROIHeads
from .seesaw_fast_rcnn import SeesawFastRCNNOutputLayers
