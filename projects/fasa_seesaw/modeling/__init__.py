# Copyright (c) fasa_seesaw contributors.
from . import global_context, nms_resampling, normed_mask_head, roi_heads  # noqa: F401
from .cls_losses import build_cls_loss, cls_loss_names, register_cls_loss, resolve_cls_loss
from .eql_loss import EQLLoss
from .eqlv2_loss import EQLv2Loss
from .fasa import FASA, fasa_from_config
from .fasa_feature_bank import ClassFeatureBank
from .fasa_feature_store import ClassFeatureStore
from .fast_rcnn import (
    FASAFastRCNNOutputLayers,
    LongTailFastRCNNOutputLayers,
    SeesawFastRCNNOutputLayers,
    box_predictors,
)
from .global_context import GlobalContextHead, GlobalContextRCNN
from .nms_resampling import LongTailRPN
from .normed_layers import NormedConv2d, NormedLinear
from .normed_mask_head import NormedMaskRCNNConvUpsampleHead
from .roi_heads import (
    FASACascadeROIHeads,
    FASAROIHeads,
    LongTailCascadeROIHeads,
    LongTailROIHeads,
    SeesawCascadeROIHeads,
    SeesawROIHeads,
)
from .seesaw_loss import SeesawLoss
