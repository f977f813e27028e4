# Copyright (c) fasa_seesaw contributors.
"""
The project's ROI heads: detectron2's StandardROIHeads and CascadeROIHeads with
:class:`LongTailFastRCNNOutputLayers` as the box predictor (built once, in ``_init_box_head``).
The classification loss, the cosine classifier and FASA are chosen by config on the predictor.
"""

from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import (
    ROI_HEADS_REGISTRY,
    CascadeROIHeads,
    StandardROIHeads,
    build_box_head,
)

from ..errors import ConfigError
from .fast_rcnn import LongTailFastRCNNOutputLayers, SeesawFastRCNNOutputLayers

__all__ = [
    "LongTailROIHeads",
    "LongTailCascadeROIHeads",
    "FASAROIHeads",
    "FASACascadeROIHeads",
    "SeesawROIHeads",
    "SeesawCascadeROIHeads",
]


def _box_pooler(cfg, input_shape):
    """detectron2's box pooler and pooled shape (as in StandardROIHeads._init_box_head)."""
    in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
    resolution = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
    in_channels = {input_shape[f].channels for f in in_features}
    if len(in_channels) != 1:
        raise ConfigError(
            f"The box head pools {in_features} with different channel counts {in_channels}; "
            "they must be equal (MODEL.ROI_HEADS.IN_FEATURES)."
        )
    pooler = ROIPooler(
        output_size=resolution,
        scales=tuple(1.0 / input_shape[k].stride for k in in_features),
        sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
        pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
    )
    shape = ShapeSpec(channels=in_channels.pop(), height=resolution, width=resolution)
    return in_features, pooler, shape


@ROI_HEADS_REGISTRY.register()
class LongTailROIHeads(StandardROIHeads):
    """
    StandardROIHeads whose box predictor is :class:`LongTailFastRCNNOutputLayers`. With
    MODEL.ROI_BOX_HEAD.CLS_LOSS "auto" the loss is ``default_cls_loss`` ("auto": detectron2's,
    as USE_SIGMOID_CE / USE_FED_LOSS select it).
    """

    default_cls_loss = "auto"
    predictor_class = LongTailFastRCNNOutputLayers

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        # detectron2's, with this predictor built once in its place: the modules are built in
        # the same order, so with a plain loss the initial weights follow the seed as there.
        in_features, pooler, shape = _box_pooler(cfg, input_shape)
        box_head = build_box_head(cfg, shape)
        return {
            "box_in_features": in_features,
            "box_pooler": pooler,
            "box_head": box_head,
            "box_predictor": cls.predictor_class(cfg, box_head.output_shape),
        }


@ROI_HEADS_REGISTRY.register()
class LongTailCascadeROIHeads(CascadeROIHeads):
    """
    CascadeROIHeads with :class:`LongTailFastRCNNOutputLayers` in every stage. Each stage keeps
    its own loss state (e.g. Seesaw's class counts) and FASA bank, since each stage samples its
    RoIs at its own IoU threshold.
    """

    default_cls_loss = "auto"
    predictor_class = LongTailFastRCNNOutputLayers

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        # detectron2's (heads and predictors built stage by stage), with this predictor.
        ious = cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS
        reg_weights = cfg.MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS
        if len(reg_weights) != len(ious):
            raise ConfigError(
                f"MODEL.ROI_BOX_CASCADE_HEAD has {len(ious)} IOUS but {len(reg_weights)} "
                "BBOX_REG_WEIGHTS; give one of each per stage."
            )
        if not cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG:
            raise ConfigError(
                "Cascade R-CNN regresses class-agnostic boxes: set "
                "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG True."
            )
        if ious[0] != cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS[0]:
            raise ConfigError(
                f"The first cascade stage's IoU {ious[0]} must equal "
                f"MODEL.ROI_HEADS.IOU_THRESHOLDS[0] ({cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS[0]})."
            )
        in_features, pooler, shape = _box_pooler(cfg, input_shape)
        box_heads, box_predictors, proposal_matchers = [], [], []
        for match_iou, weights in zip(ious, reg_weights):
            box_head = build_box_head(cfg, shape)
            box_heads.append(box_head)
            box_predictors.append(
                cls.predictor_class(
                    cfg, box_head.output_shape, box2box_transform=Box2BoxTransform(weights=weights)
                )
            )
            proposal_matchers.append(Matcher([match_iou], [0, 1], allow_low_quality_matches=False))
        return {
            "box_in_features": in_features,
            "box_pooler": pooler,
            "box_heads": box_heads,
            "box_predictors": box_predictors,
            "proposal_matchers": proposal_matchers,
        }

    def _forward_box(self, features, proposals, targets=None):
        last = self.box_predictor[-1]
        if self.training or not last.score_floor_active:
            return super()._forward_box(features, proposals, targets)
        # Top-K-per-class inference: detectron2's stage loop, then the last predictor's
        # inference with the per-class score floor on the stage-averaged scores.
        features = [features[f] for f in self.box_in_features]
        head_outputs = []
        prev_pred_boxes = None
        image_sizes = [x.image_size for x in proposals]
        for k in range(self.num_cascade_stages):
            if k > 0:
                proposals = self._create_proposals_from_boxes(prev_pred_boxes, image_sizes)
            predictions = self._run_stage(features, proposals, k)
            prev_pred_boxes = self.box_predictor[k].predict_boxes(predictions, proposals)
            head_outputs.append((self.box_predictor[k], predictions, proposals))
        scores_per_stage = [h[0].predict_probs(h[1], h[2]) for h in head_outputs]
        scores = [
            sum(list(scores_per_image)) * (1.0 / self.num_cascade_stages)
            for scores_per_image in zip(*scores_per_stage)
        ]
        predictor, predictions, proposals = head_outputs[-1]
        boxes = predictor.predict_boxes(predictions, proposals)
        pred_instances, _ = predictor.inference_from_scores(boxes, scores, image_sizes)
        return pred_instances


# The names the ROI heads had before one head served every loss; configs naming them keep working.
@ROI_HEADS_REGISTRY.register()
class FASAROIHeads(LongTailROIHeads):
    """:class:`LongTailROIHeads` (detectron2's classification loss by default)."""


@ROI_HEADS_REGISTRY.register()
class FASACascadeROIHeads(LongTailCascadeROIHeads):
    """:class:`LongTailCascadeROIHeads` (detectron2's classification loss by default)."""


@ROI_HEADS_REGISTRY.register()
class SeesawROIHeads(LongTailROIHeads):
    """:class:`LongTailROIHeads` with Seesaw Loss by default (CLS_LOSS "auto")."""

    default_cls_loss = "seesaw"
    predictor_class = SeesawFastRCNNOutputLayers


@ROI_HEADS_REGISTRY.register()
class SeesawCascadeROIHeads(LongTailCascadeROIHeads):
    """:class:`LongTailCascadeROIHeads` with Seesaw Loss by default (CLS_LOSS "auto")."""

    default_cls_loss = "seesaw"
    predictor_class = SeesawFastRCNNOutputLayers
