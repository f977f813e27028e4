# Copyright (c) fasa_seesaw contributors.
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads, StandardROIHeads

from .seesaw_fast_rcnn import SeesawFastRCNNOutputLayers

__all__ = ["SeesawROIHeads", "SeesawCascadeROIHeads"]


@ROI_HEADS_REGISTRY.register()
class SeesawROIHeads(StandardROIHeads):
    """StandardROIHeads whose box predictor is :class:`SeesawFastRCNNOutputLayers`."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = SeesawFastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        return ret


@ROI_HEADS_REGISTRY.register()
class SeesawCascadeROIHeads(CascadeROIHeads):
    """
    CascadeROIHeads with Seesaw in every stage. Each stage's predictor keeps its own class
    counts, since each stage samples its RoIs at its own IoU threshold.
    """

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictors"] = [
            SeesawFastRCNNOutputLayers(
                cfg, head.output_shape, box2box_transform=predictor.box2box_transform
            )
            for head, predictor in zip(ret["box_heads"], ret["box_predictors"])
        ]
        return ret
