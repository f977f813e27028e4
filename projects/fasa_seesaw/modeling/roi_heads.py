# Copyright (c) fasa_seesaw contributors.
"""
The project's ROI heads: detectron2's StandardROIHeads and CascadeROIHeads with
:class:`LongTailFastRCNNOutputLayers` as the box predictor (built once, in ``_init_box_head``).
The classification loss, the cosine classifier and FASA are chosen by config on the predictor.
"""

import re
from typing import List, Optional, Sequence
import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import (
    ROI_HEADS_REGISTRY,
    CascadeROIHeads,
    StandardROIHeads,
    build_box_head,
    build_mask_head,
    select_foreground_proposals,
)
from detectron2.modeling.roi_heads.cascade_rcnn import _ScaleGradient
from detectron2.structures import Instances, pairwise_iou
from detectron2.utils.events import get_event_storage

from ..errors import ConfigError, check_choice
from .fast_rcnn import LongTailFastRCNNOutputLayers, SeesawFastRCNNOutputLayers
from .global_context import GlobalContextHead

__all__ = [
    "LongTailROIHeads",
    "LongTailCascadeROIHeads",
    "FASAROIHeads",
    "FASACascadeROIHeads",
    "SeesawROIHeads",
    "SeesawCascadeROIHeads",
    "SCORE_AVERAGES",
    "CASCADE_MASK_HEADS",
]

# How a cascade combines its stages' class scores at test, and how many mask heads it has.
SCORE_AVERAGES = ("probs", "logits")
CASCADE_MASK_HEADS = ("one", "per_stage", "last")


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

    Three switches (MODEL.ROI_BOX_CASCADE_HEAD) choose between detectron2's cascade and
    mmdetection's Cascade Mask R-CNN, whose checkpoints the project converts, and HTC-Lite's:

    - SCORE_AVERAGE: "probs" (detectron2) averages the stages' probabilities; "logits"
      (mmdetection) averages the stages' logits, then applies the last predictor's activation.
    - MASK_HEADS: "one" (detectron2) is a single mask head trained on the first stage's sampled
      RoIs; "per_stage" (mmdetection) gives every stage a mask head trained on that stage's RoIs,
      and at test the stages' mask probabilities on the final boxes are averaged; "last"
      (HTC-Lite) is a single mask head trained on the last stage's RoIs (with stage weights,
      its loss is weighted by their sum, as in mmdetection's SCNet).
    - STAGE_LOSS_WEIGHTS: [] (detectron2) adds the stages' losses and scales the gradient into
      the pooled box features by 1/stages; a weight per stage (mmdetection: 1, 0.5, 0.25)
      multiplies that stage's box and mask losses, with no gradient scaling.

    With MODEL.GLOBAL_CONTEXT.ENABLED (HTC-Lite) a :class:`GlobalContextHead` encodes each image
    into one vector, added to every pooled RoI feature of the box heads and the mask head(s),
    and trained by its own multi-label loss (``loss_global_context``).
    """

    default_cls_loss = "auto"
    predictor_class = LongTailFastRCNNOutputLayers

    @configurable
    def __init__(
        self,
        *,
        score_average: str = "probs",
        mask_heads: str = "one",
        stage_loss_weights: Sequence[float] = (),
        global_context: Optional[GlobalContextHead] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.global_context = global_context
        # Per forward: the images' context vectors, and (GlobalContextRCNN, training) their
        # verified-negative categories.
        self._context: Optional[torch.Tensor] = None
        self.image_negatives: Optional[list] = None
        if global_context is not None and self.mask_on and self.mask_pooler is None:
            raise ConfigError(
                "MODEL.GLOBAL_CONTEXT adds the context to pooled RoI features, but the mask head "
                "pools nothing (MODEL.ROI_MASK_HEAD.POOLER_TYPE is empty): set a pooler type."
            )
        check_choice("MODEL.ROI_BOX_CASCADE_HEAD.SCORE_AVERAGE", score_average, SCORE_AVERAGES)
        check_choice("MODEL.ROI_BOX_CASCADE_HEAD.MASK_HEADS", mask_heads, CASCADE_MASK_HEADS)
        n = self.num_cascade_stages
        if stage_loss_weights and len(stage_loss_weights) != n:
            raise ConfigError(
                f"MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS has {len(stage_loss_weights)} "
                f"weights for {n} stages; give one per stage (mmdetection: [1.0, 0.5, 0.25]) or "
                "[] for detectron2's."
            )
        self.score_average = score_average
        self.per_stage_masks = self.mask_on and mask_heads == "per_stage"
        self.last_stage_mask = self.mask_on and mask_heads == "last"
        if self.per_stage_masks and (
            not isinstance(self.mask_head, nn.ModuleList) or len(self.mask_head) != n
        ):
            raise ConfigError(
                f"MODEL.ROI_BOX_CASCADE_HEAD.MASK_HEADS per_stage needs {n} mask heads "
                "(one per stage); build the heads with from_config."
            )
        self.stage_loss_weights = [float(w) for w in stage_loss_weights]
        # Each stage's labelled RoIs, recorded only while forward() trains per-stage mask heads.
        self._stage_proposals: Optional[List[List[Instances]]] = None

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        c = cfg.MODEL.ROI_BOX_CASCADE_HEAD
        ret["score_average"] = c.SCORE_AVERAGE
        ret["mask_heads"] = c.MASK_HEADS
        ret["stage_loss_weights"] = list(c.STAGE_LOSS_WEIGHTS)
        if cfg.MODEL.GLOBAL_CONTEXT.ENABLED:
            roi_channels = input_shape[cfg.MODEL.ROI_HEADS.IN_FEATURES[0]].channels
            ret["global_context"] = GlobalContextHead.from_config(cfg, input_shape, roi_channels)
        return ret

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

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        # detectron2's one head; with MASK_HEADS per_stage, more of the same after it (so the
        # first head's initial weights follow the seed as in the one-head model).
        ret = super()._init_mask_head(cfg, input_shape)
        if not cfg.MODEL.MASK_ON or cfg.MODEL.ROI_BOX_CASCADE_HEAD.MASK_HEADS != "per_stage":
            return ret
        if not cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE:
            raise ConfigError(
                "MODEL.ROI_BOX_CASCADE_HEAD.MASK_HEADS per_stage pools RoI features: set "
                "MODEL.ROI_MASK_HEAD.POOLER_TYPE (e.g. ROIAlignV2)."
            )
        res = cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION
        channels = input_shape[cfg.MODEL.ROI_HEADS.IN_FEATURES[0]].channels
        shape = ShapeSpec(channels=channels, width=res, height=res)
        n = len(cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS)
        heads = [ret["mask_head"]] + [build_mask_head(cfg, shape) for _ in range(n - 1)]
        ret["mask_head"] = nn.ModuleList(heads)
        return ret

    # ------------------------------------------------------------------ training
    def forward(self, images, features, proposals, targets=None):
        if self.global_context is None:
            return self._forward(images, features, proposals, targets)
        logits, self._context = self.global_context(features)
        try:
            proposals, losses = self._forward(images, features, proposals, targets)
        finally:
            self._context = None
        # (No loss for a frozen encoder, as in the dual-head stage.)
        if self.training and any(p.requires_grad for p in self.global_context.parameters()):
            gt_classes = [t.gt_classes for t in targets]
            losses.update(self.global_context.losses(logits, gt_classes, self.image_negatives))
        return proposals, losses

    def forward_with_given_boxes(self, features, instances):
        # (Called directly by detectron2's TTA, without forward: the context is made here.)
        if self.global_context is None or self._context is not None:
            return super().forward_with_given_boxes(features, instances)
        self._context = self.global_context(features)[1]
        try:
            return super().forward_with_given_boxes(features, instances)
        finally:
            self._context = None

    def _forward(self, images, features, proposals, targets=None):
        if not (
            self.training
            and (self.per_stage_masks or self.last_stage_mask or self.stage_loss_weights)
        ):
            return super().forward(images, features, proposals, targets)
        del images
        proposals = self.label_and_sample_proposals(proposals, targets)
        record = self.per_stage_masks or self.last_stage_mask
        self._stage_proposals = [] if record else None
        try:
            losses = self._forward_box(features, proposals, targets)
            stage_proposals = self._stage_proposals
        finally:
            self._stage_proposals = None
        if self.per_stage_masks and self.mask_on:  # (off in the dual-head stage's training)
            losses.update(self._per_stage_mask_losses(features, stage_proposals))
        elif self.last_stage_mask and self.mask_on:
            # HTC-Lite: the one mask head learns from the last stage's RoIs. With stage weights
            # its loss takes their sum, as mmdetection's SCNet weights its one mask head's.
            last = self.num_cascade_stages - 1
            mask_losses = self._forward_mask(features, stage_proposals[last])
            weight = sum(self.stage_loss_weights) if self.stage_loss_weights else 1.0
            losses.update({k: v * weight for k, v in mask_losses.items()})
        else:
            losses.update(self._forward_mask(features, proposals))
        losses.update(self._forward_keypoint(features, proposals))
        return proposals, losses

    def _add_context(self, x, boxes):
        """Pooled RoI features plus their image's context vector (unchanged without one)."""
        if self._context is None:
            return x
        counts = torch.as_tensor([len(b) for b in boxes], device=x.device)
        context = self._context.to(x.dtype).repeat_interleave(counts, dim=0)
        return x + context[:, :, None, None]

    def _stage_weight(self, stage: int) -> float:
        return self.stage_loss_weights[stage] if self.stage_loss_weights else 1.0

    def _per_stage_mask_losses(self, features, stage_proposals):
        feats = [features[f] for f in self.mask_in_features]
        storage = get_event_storage()
        losses = {}
        for k, proposals in enumerate(stage_proposals):
            fg, _ = select_foreground_proposals(proposals, self.num_classes)
            boxes = [p.proposal_boxes for p in fg]
            x = self._add_context(self.mask_pooler(feats, boxes), boxes)
            with storage.name_scope(f"stage{k}"):  # each head's mask_rcnn/* metrics
                stage_losses = self.mask_head[k](x, fg)
            for name, value in stage_losses.items():
                losses[f"{name}_stage{k}"] = value * self._stage_weight(k)
        return losses

    @torch.no_grad()
    def _match_and_label_boxes(self, proposals, stage, targets):
        proposals = super()._match_and_label_boxes(proposals, stage, targets)
        last = stage == self.num_cascade_stages - 1
        if not (self.mask_on and (self.per_stage_masks or (self.last_stage_mask and last))):
            return proposals
        # This stage trains a mask head: its RoIs need the matched ground truth's masks too
        # (detectron2 labels later stages with classes and boxes only). The same matcher on
        # the same IoUs gives the same matches.
        for props, trg in zip(proposals, targets):
            if len(trg) == 0 or not trg.has("gt_masks"):
                continue
            iou = pairwise_iou(trg.gt_boxes, props.proposal_boxes)
            matched_idxs, _ = self.proposal_matchers[stage](iou)
            props.gt_masks = trg.gt_masks[matched_idxs]
        return proposals

    def _run_stage(self, features, proposals, stage):
        if self.training and self._stage_proposals is not None:
            self._stage_proposals.append(proposals)
        # detectron2's, with the image context added to the pooled features; with stage loss
        # weights (mmdetection) no gradient scaling on them.
        boxes = [x.proposal_boxes for x in proposals]
        box_features = self._add_context(self.box_pooler(features, boxes), boxes)
        if self.training and not self.stage_loss_weights:
            box_features = _ScaleGradient.apply(box_features, 1.0 / self.num_cascade_stages)
        box_features = self.box_head[stage](box_features)
        return self.box_predictor[stage](box_features)

    # ------------------------------------------------------------------ both
    def _forward_box(self, features, proposals, targets=None):
        if self.training:
            losses = super()._forward_box(features, proposals, targets)
            if not self.stage_loss_weights:
                return losses
            weighted = {}
            for name, value in losses.items():
                stage = re.search(r"_stage(\d+)$", name)
                weighted[name] = value * self._stage_weight(int(stage.group(1))) if stage else value
            return weighted
        # detectron2's stage loop, then the last predictor's inference on the combined scores
        # (with the per-class score floor of top-K-per-class inference, when active).
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
        predictor, predictions, proposals = head_outputs[-1]
        if self.score_average == "logits":
            logits = sum(h[1][0] for h in head_outputs) / self.num_cascade_stages
            scores = predictor.predict_probs((logits, None), proposals)
        else:
            scores_per_stage = [h[0].predict_probs(h[1], h[2]) for h in head_outputs]
            scores = [
                sum(list(scores_per_image)) * (1.0 / self.num_cascade_stages)
                for scores_per_image in zip(*scores_per_stage)
            ]
        boxes = predictor.predict_boxes(predictions, proposals)
        pred_instances, _ = predictor.inference_from_scores(boxes, scores, image_sizes)
        return pred_instances

    # ------------------------------------------------------------------ inference
    def _forward_mask(self, features, instances):
        if not self.mask_on:  # (also TTA's box pass, per-stage heads or not)
            return {} if self.training else instances
        if self._context is not None and not self.per_stage_masks:
            return self._context_mask(features, instances)
        if self.training or not self.per_stage_masks:
            return super()._forward_mask(features, instances)
        # mmdetection's Cascade Mask R-CNN: every stage's head on the final boxes, the mean of
        # their probabilities for each box's predicted class.
        feats = [features[f] for f in self.mask_in_features]
        boxes = [i.pred_boxes for i in instances]
        x = self._add_context(self.mask_pooler(feats, boxes), boxes)
        classes = cat([i.pred_classes for i in instances])
        rows = torch.arange(len(classes), device=classes.device)
        probs = None
        for head in self.mask_head:
            logits = head.layers(x)
            cls_index = classes if logits.shape[1] > 1 else torch.zeros_like(classes)
            p = logits[rows, cls_index][:, None].sigmoid()
            probs = p if probs is None else probs + p
        probs = probs / len(self.mask_head)
        for inst, p in zip(instances, probs.split([len(i) for i in instances])):
            inst.pred_masks = p
        return instances

    def _context_mask(self, features, instances):
        # detectron2's StandardROIHeads._forward_mask with the context added to the pooled
        # features.
        if self.training:
            instances, _ = select_foreground_proposals(instances, self.num_classes)
        feats = [features[f] for f in self.mask_in_features]
        boxes = [x.proposal_boxes if self.training else x.pred_boxes for x in instances]
        return self.mask_head(self._add_context(self.mask_pooler(feats, boxes), boxes), instances)


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
