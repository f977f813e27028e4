# Copyright (c) fasa_seesaw contributors.
"""
The box predictor of the project: detectron2's FastRCNNOutputLayers with a classification loss
chosen by config, an optional cosine classifier, an optional :class:`~.fasa.FASA`, per-class
score floors for top-K inference, and hooks on the class scores for statistics.
"""

import contextlib
from collections import OrderedDict
from typing import Callable, List, Optional, Tuple
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers, fast_rcnn_inference
from detectron2.structures import Instances

from ..errors import ConfigError
from .cls_losses import DETECTRON2_LOSSES, build_cls_loss, resolve_cls_loss
from .fasa import FASA, fasa_from_config
from .normed_layers import NormedLinear

__all__ = ["LongTailFastRCNNOutputLayers", "FASAFastRCNNOutputLayers", "SeesawFastRCNNOutputLayers"]


class LongTailFastRCNNOutputLayers(FastRCNNOutputLayers):
    """
    With ``cls_loss=None``, no cosine classifier and ``fasa=None`` this is detectron2's
    FastRCNNOutputLayers (softmax CE, or sigmoid CE / federated loss as its flags say).

    - ``cls_loss``: a classification-loss module (:mod:`.cls_losses`), e.g. :class:`SeesawLoss`;
      the classifier gets its ``num_logits`` outputs and test-time scores come from its
      ``activation``.
    - ``normed_classifier``: the cosine classifier :class:`NormedLinear` with ``norm_temp``.
    - ``fasa``: FASA. The predictor hands it the classifier input of each training forward, the
      classifier and :meth:`per_roi_cls_loss`; it adds ``loss_fasa`` and, inside
      ``fasa.collect_val_losses()``, turns training forwards into a validation-loss collection.
    - ``dual_head``: the dual-head classification stage (Seesaw supplement 4.2). A second
      classifier ``dual_cls_score`` of the same kind, with its own loss module ``dual_cls_loss``
      (None: detectron2's loss), beside the trained one; the class scores this predictor returns
      are both classifiers' logits side by side. Training computes only the second classifier's
      loss (``loss_cls_dual``; the rest of the model is frozen by
      :func:`~.dual_head.freeze_for_dual_head`); inference averages the two classifiers' scores.
    - :meth:`register_scores_hook` and :meth:`score_floor` are the extension points for
      gradient statistics and top-K-per-class inference.
    """

    # The loss MODEL.ROI_BOX_HEAD.CLS_LOSS "auto" selects ("auto": the ROI head's default).
    default_cls_loss = "auto"

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        cls_loss: Optional[nn.Module] = None,
        normed_classifier: bool = False,
        norm_temp: float = 20.0,
        fasa: Optional[FASA] = None,
        dual_head: bool = False,
        dual_cls_loss: Optional[nn.Module] = None,
        **kwargs,
    ):
        """
        Args:
            cls_loss: classification-loss module; None keeps detectron2's loss.
            normed_classifier, norm_temp: cosine classifier and its temperature.
            fasa: a :class:`FASA` on this predictor's classifier input, or None.
            dual_head: add the second classifier of the dual-head stage.
            dual_cls_loss: its loss module (of the same kind as ``cls_loss``; None when
                ``cls_loss`` is None).
            kwargs: as in :class:`FastRCNNOutputLayers`.
        """
        super().__init__(input_shape, **kwargs)
        if cls_loss is not None and (self.use_sigmoid_ce or self.use_fed_loss):
            raise ConfigError(
                f"{type(cls_loss).__name__} replaces detectron2's classification loss and cannot "
                "be combined with use_sigmoid_ce / use_fed_loss (MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE "
                "and USE_FED_LOSS); set both False."
            )
        if fasa is not None:
            _feature_dim(input_shape)  # FASA needs a flat feature
        in_features = self.cls_score.in_features
        num_logits = self.num_classes + 1 if cls_loss is None else cls_loss.num_logits
        if normed_classifier:
            self.cls_score = NormedLinear(in_features, num_logits, temperature=norm_temp)
        elif num_logits != self.cls_score.out_features:
            self.cls_score = _linear_classifier(in_features, num_logits)
        if hasattr(cls_loss, "init_classifier"):
            cls_loss.init_classifier(self.cls_score)  # e.g. a sigmoid loss's prior bias
        self.cls_loss = cls_loss
        self.dual_cls_score: Optional[nn.Module] = None
        self.dual_cls_loss = None
        if dual_head:
            if fasa is not None:
                raise ConfigError(
                    "The dual-head stage trains a second classifier on a frozen model; FASA "
                    "cannot be part of it. Set MODEL.FASA.ENABLED False for that stage."
                )
            if (cls_loss is None) != (dual_cls_loss is None):
                raise ConfigError("The dual head's loss must be of the same kind as the first.")
            if normed_classifier:
                self.dual_cls_score = NormedLinear(in_features, num_logits, temperature=norm_temp)
            else:
                self.dual_cls_score = _linear_classifier(in_features, num_logits)
            if hasattr(dual_cls_loss, "init_classifier"):
                dual_cls_loss.init_classifier(self.dual_cls_score)
            self.dual_cls_loss = dual_cls_loss
        self.fasa = fasa
        self._fasa_input: Optional[torch.Tensor] = None
        self._scores_hooks: "OrderedDict[int, Callable]" = OrderedDict()
        self._score_floor: Optional[Callable[[int], torch.Tensor]] = None
        self._max_per_image = -1

    @classmethod
    def from_config(cls, cfg, input_shape, **kwargs):
        ret = super().from_config(cfg, input_shape)
        name = resolve_cls_loss(cfg, cls.default_cls_loss)
        if name in DETECTRON2_LOSSES:
            ret["use_sigmoid_ce"], ret["use_fed_loss"] = DETECTRON2_LOSSES[name]
        ret["cls_loss"] = build_cls_loss(cfg, name)
        ret["normed_classifier"] = cfg.MODEL.ROI_BOX_HEAD.NORMED_CLASSIFIER
        ret["norm_temp"] = cfg.MODEL.ROI_BOX_HEAD.NORM_TEMP
        if cfg.MODEL.FASA.ENABLED:
            ret["fasa"] = fasa_from_config(cfg, _feature_dim(input_shape))
        if cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED:
            ret["dual_head"] = True
            ret["dual_cls_loss"] = build_cls_loss(cfg, name)
        ret.update(kwargs)  # explicit arguments win over the config
        return ret

    @property
    def dual_head(self) -> bool:
        return self.dual_cls_score is not None

    def split_scores(self, scores):
        """(first classifier's logits, second's or None) of this predictor's class scores."""
        if not self.dual_head:
            return scores, None
        n = self.cls_score.out_features
        return scores[:, :n], scores[:, n:]

    # ------------------------------------------------------------------ forward and losses
    def forward(self, x):
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        if self.fasa is not None and self.training:
            self._fasa_input = x
        scores = self.cls_score(x)
        if self.dual_cls_score is not None:  # (written out so TorchScript prunes it)
            scores = torch.cat([scores, self.dual_cls_score(x)], dim=1)
        proposal_deltas = self.bbox_pred(x)
        return scores, proposal_deltas

    def losses(self, predictions, proposals):
        scores, proposal_deltas = predictions
        gt_classes = (
            cat([p.gt_classes for p in proposals], dim=0)
            if len(proposals)
            else torch.empty(0, dtype=torch.long, device=scores.device)
        )
        fasa_input, self._fasa_input = self._fasa_input, None
        if self.dual_head:
            return self._dual_head_losses(scores, proposal_deltas, proposals, gt_classes)
        if self.fasa is not None and self.fasa.collecting:
            # FASA's validation pass: changes no statistic and trains nothing.
            self.fasa.collect(self.per_roi_cls_loss(scores, gt_classes), gt_classes)
            return {}
        for hook in self._scores_hooks.values():
            hook(scores, gt_classes)
        if self.cls_loss is None:
            losses = super().losses(predictions, proposals)
        else:
            losses = self.cls_loss(scores, gt_classes)
            losses["loss_box_reg"] = self._box_reg_loss(proposals, proposal_deltas, gt_classes)
            # As detectron2: loss_weight scales every loss it names (1.0 leaves values exact).
            losses = {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}
        if self.fasa is not None and fasa_input is not None:
            losses["loss_fasa"] = self.fasa.loss(
                fasa_input, gt_classes, self.cls_score, self.per_roi_cls_loss
            )
        return losses

    def _dual_head_losses(self, scores, proposal_deltas, proposals, gt_classes):
        # Only the second classifier trains; the first, box regression and FASA are frozen.
        _, dual = self.split_scores(scores)
        for hook in self._scores_hooks.values():
            hook(dual, gt_classes)
        if self.dual_cls_loss is None:
            loss = super().losses((dual, proposal_deltas), proposals)["loss_cls"]
            return {"loss_cls_dual": loss}  # (already weighted by loss_weight)
        losses = self.dual_cls_loss(dual, gt_classes)
        return {f"{k}_dual": v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    def _box_reg_loss(self, proposals, proposal_deltas, gt_classes):
        if len(proposals):
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
            gt_boxes = cat(
                [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals],
                dim=0,
            )
        else:
            proposal_boxes = gt_boxes = torch.empty((0, 4), device=proposal_deltas.device)
        return self.box_reg_loss(proposal_boxes, gt_boxes, proposal_deltas, gt_classes)

    def per_roi_cls_loss(self, scores, gt_classes):
        """Per-RoI classification loss (R,) of the kind used in training, changing no state; only
        foreground rows are meaningful."""
        if self.cls_loss is not None:
            return self.cls_loss.per_roi(scores, gt_classes)
        if self.use_sigmoid_ce:
            target = F.one_hot(gt_classes, self.num_classes + 1)[:, : self.num_classes].to(scores)
            return F.binary_cross_entropy_with_logits(scores[:, :-1], target, reduction="none").sum(
                dim=1
            )
        return F.cross_entropy(scores.float(), gt_classes, reduction="none")

    def register_scores_hook(self, hook: Callable[[torch.Tensor, torch.Tensor], None]):
        """
        ``hook(scores, gt_classes)`` is called in every training loss computation (not in FASA's
        validation pass) before the loss is formed; it may register tensor hooks on ``scores``
        but must not change it. Returns a handle whose ``remove()`` unregisters it.
        """
        handle = RemovableHandle(self._scores_hooks)
        self._scores_hooks[handle.id] = hook
        return handle

    # ------------------------------------------------------------------ inference
    def predict_probs(
        self, predictions: Tuple[torch.Tensor, torch.Tensor], proposals: List[Instances]
    ):
        # detectron2's, with the loss's activation; no super() call, so the predictor with
        # detectron2's loss scripts (a loss module such as SeesawLoss does not), and __len__
        # rather than len(), so it traces (as detectron2's patch_builtin_len makes detectron2's
        # own do).
        # (The attribute checks below are written out so TorchScript prunes them.)
        scores, _ = predictions
        num_inst_per_image = [p.__len__() for p in proposals]
        if self.dual_cls_score is not None:  # the dual-head stage: both classifiers' mean
            n = self.cls_score.out_features
            probs = (self._first_probs(scores[:, :n]) + self._dual_probs(scores[:, n:])) * 0.5
        else:
            probs = self._first_probs(scores)
        return probs.split(num_inst_per_image, dim=0)

    def _first_probs(self, scores):
        if self.cls_loss is not None:
            return self.cls_loss.activation(scores)
        return self._detectron2_probs(scores)

    def _dual_probs(self, scores):
        if self.dual_cls_loss is not None:
            return self.dual_cls_loss.activation(scores)
        return self._detectron2_probs(scores)

    def _detectron2_probs(self, scores):
        if self.use_sigmoid_ce:
            return scores.sigmoid()
        return F.softmax(scores, dim=-1)

    @contextlib.contextmanager
    def score_floor(self, floor_fn: Callable[[int], torch.Tensor], max_per_image: int = -1):
        """
        Inside, inference replaces its per-image cap (TEST.DETECTIONS_PER_IMAGE) by
        ``max_per_image`` (-1: none) and drops class-c scores at or below ``floor_fn(C)[c]``;
        the score threshold still applies (see :mod:`fasa_seesaw.evaluation.topk_inference`).
        """
        saved = self._score_floor, self._max_per_image
        self._score_floor, self._max_per_image = floor_fn, max_per_image
        try:
            yield self
        finally:
            self._score_floor, self._max_per_image = saved

    @property
    def score_floor_active(self) -> bool:
        return self._score_floor is not None

    def inference(self, predictions: Tuple[torch.Tensor, torch.Tensor], proposals: List[Instances]):
        # detectron2's, through inference_from_scores (where the score floor applies).
        boxes = self.predict_boxes(predictions, proposals)
        scores = self.predict_probs(predictions, proposals)
        image_shapes = [x.image_size for x in proposals]
        return self.inference_from_scores(boxes, scores, image_shapes)

    def inference_from_scores(
        self,
        boxes: List[torch.Tensor],
        scores: List[torch.Tensor],
        image_shapes: List[Tuple[int, int]],
    ):
        """detectron2's ``fast_rcnn_inference`` on given per-image boxes and scores, with the
        active score floor (the cascade heads call it with stage-averaged scores)."""
        topk = self.test_topk_per_image
        if self._score_floor is not None:
            scores = [self._apply_floor(s) for s in scores]
            topk = self._max_per_image
        return fast_rcnn_inference(
            boxes, scores, image_shapes, self.test_score_thresh, self.test_nms_thresh, topk
        )

    def _apply_floor(self, scores):
        num_classes = scores.shape[1] - 1
        floor = self._score_floor(num_classes).to(device=scores.device, dtype=scores.dtype)
        scores = scores.clone()
        fg = scores[:, :num_classes]
        fg[fg <= floor[None, :]] = 0.0  # <= score_thresh (>= 0): filtered out
        return scores

    # ------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints from before the loss and FASA became modules kept their state on the
        # predictor: class_counts, fasa_bank.*, fasa_probs, fasa_probs_initialized.
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix) :]
            if rest == "class_counts":
                state_dict[prefix + "cls_loss.class_counts"] = state_dict.pop(key)
            elif rest.startswith("fasa_"):
                state_dict[prefix + "fasa." + rest[len("fasa_") :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _linear_classifier(in_features: int, num_logits: int) -> nn.Linear:
    """detectron2's classifier layer (normal init, std 0.01; zero bias)."""
    layer = nn.Linear(in_features, num_logits)
    nn.init.normal_(layer.weight, std=0.01)
    nn.init.constant_(layer.bias, 0)
    return layer


def _feature_dim(input_shape) -> int:
    if isinstance(input_shape, int):
        return input_shape
    if (input_shape.height or 1) * (input_shape.width or 1) > 1:
        raise ConfigError(
            "FASA models the box head's last fully-connected feature, but this box head outputs a "
            f"{input_shape.channels}x{input_shape.height}x{input_shape.width} map. Use a box head "
            "with fully-connected layers (MODEL.ROI_BOX_HEAD.NUM_FC >= 1), or set "
            "MODEL.FASA.ENABLED False."
        )
    return input_shape.channels


def project_predictor_error(keys: List[str], found: str) -> ConfigError:
    """The error for settings that need the project's box predictor where there is none."""
    return ConfigError(
        f"{', '.join(keys)} need(s) the project's box predictor, but {found}. Use "
        "LongTailROIHeads (or LongTailCascadeROIHeads for Cascade R-CNN)."
    )


def box_predictors(model, required_by: Optional[str] = None) -> List[LongTailFastRCNNOutputLayers]:
    """The project's box predictors of ``model`` (every cascade stage), in order. With
    ``required_by`` (the setting that needs them), none is a ConfigError."""
    model = model.module if hasattr(model, "module") else model
    found = [m for m in model.modules() if isinstance(m, LongTailFastRCNNOutputLayers)]
    if required_by and not found:
        raise project_predictor_error([required_by], f"{type(model).__name__} has none")
    return found


# The names of the predictors before they became one class.
FASAFastRCNNOutputLayers = LongTailFastRCNNOutputLayers


class SeesawFastRCNNOutputLayers(LongTailFastRCNNOutputLayers):
    """:class:`LongTailFastRCNNOutputLayers` with Seesaw Loss and the cosine classifier by
    default, built by hand or from a config (the predictor of SeesawROIHeads /
    SeesawCascadeROIHeads, whose cosine classifier is always on, as before the switch moved to
    MODEL.ROI_BOX_HEAD). Configs select the loss with MODEL.ROI_BOX_HEAD.CLS_LOSS on
    LongTailROIHeads instead."""

    default_cls_loss = "seesaw"

    @configurable
    def __init__(self, input_shape, *, cls_loss=None, normed_classifier=True, **kwargs):
        from .seesaw_loss import SeesawLoss

        if cls_loss is None:
            cls_loss = SeesawLoss(kwargs["num_classes"])
        super().__init__(
            input_shape, cls_loss=cls_loss, normed_classifier=normed_classifier, **kwargs
        )

    @classmethod
    def from_config(cls, cfg, input_shape, **kwargs):
        ret = super().from_config(cfg, input_shape, **kwargs)
        ret["normed_classifier"] = True  # so the Seesaw heads' configs and checkpoints keep
        return ret  # their meaning
