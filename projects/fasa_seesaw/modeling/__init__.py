# Copyright (c) fasa_seesaw contributors.
from . import normed_mask_head, roi_heads  # noqa: F401  (registration)
from .fasa_fast_rcnn import FASAFastRCNNOutputLayers
from .fasa_feature_bank import ClassFeatureBank
from .normed_layers import NormedConv2d, NormedLinear
from .normed_mask_head import NormedMaskRCNNConvUpsampleHead
from .roi_heads import FASACascadeROIHeads, FASAROIHeads, SeesawCascadeROIHeads, SeesawROIHeads
from .seesaw_fast_rcnn import SeesawFastRCNNOutputLayers
