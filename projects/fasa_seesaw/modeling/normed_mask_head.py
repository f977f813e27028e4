# Copyright (c) fasa_seesaw contributors.
from torch import nn

from detectron2.config import configurable
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY, MaskRCNNConvUpsampleHead

from .normed_layers import NormedConv2d

__all__ = ["NormedMaskRCNNConvUpsampleHead"]


@ROI_MASK_HEAD_REGISTRY.register()
class NormedMaskRCNNConvUpsampleHead(MaskRCNNConvUpsampleHead):
    """
    MaskRCNNConvUpsampleHead whose final 1x1 predictor is a cosine convolution ("Norm Mask" of
    the Seesaw paper), so rare classes' mask logits are not dwarfed by head-class filter norms.
    """

    @configurable
    def __init__(self, input_shape, *, temperature: float = 20.0, **kwargs):
        super().__init__(input_shape, **kwargs)
        old = self.predictor
        self.predictor = NormedConv2d(
            old.in_channels, old.out_channels, kernel_size=1, temperature=temperature
        )
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["temperature"] = cfg.MODEL.ROI_MASK_HEAD.NORM_TEMP
        return ret
