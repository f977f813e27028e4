# Copyright (c) fasa_seesaw contributors.
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads, StandardROIHeads

from .fasa_fast_rcnn import FASAFastRCNNOutputLayers
from .seesaw_fast_rcnn import SeesawFastRCNNOutputLayers

__all__ = ["FASAROIHeads", "FASACascadeROIHeads", "SeesawROIHeads", "SeesawCascadeROIHeads"]


@ROI_HEADS_REGISTRY.register()
class FASAROIHeads(StandardROIHeads):
    """
    StandardROIHeads with detectron2's own classification loss (softmax CE, or sigmoid CE /
    federated loss) and FASA when MODEL.FASA.ENABLED. Only the predictor is swapped.
    """

    predictor_class = FASAFastRCNNOutputLayers

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = cls.predictor_class(cfg, ret["box_head"].output_shape)
        return ret


@ROI_HEADS_REGISTRY.register()
class SeesawROIHeads(FASAROIHeads):
    """StandardROIHeads whose predictor is :class:`SeesawFastRCNNOutputLayers` (FASA optional)."""

    predictor_class = SeesawFastRCNNOutputLayers


@ROI_HEADS_REGISTRY.register()
class FASACascadeROIHeads(CascadeROIHeads):
    """
    CascadeROIHeads with FASA-capable predictors in every stage. Each stage keeps its own class
    counts and feature bank, since each stage samples its RoIs at its own IoU threshold.
    """

    predictor_class = FASAFastRCNNOutputLayers

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictors"] = [
            cls.predictor_class(
                cfg, head.output_shape, box2box_transform=predictor.box2box_transform
            )
            for head, predictor in zip(ret["box_heads"], ret["box_predictors"])
        ]
        return ret


@ROI_HEADS_REGISTRY.register()
class SeesawCascadeROIHeads(FASACascadeROIHeads):
    """CascadeROIHeads with Seesaw (and optionally FASA) in every stage."""

    predictor_class = SeesawFastRCNNOutputLayers
