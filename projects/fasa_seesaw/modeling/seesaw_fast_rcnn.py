# Copyright (c) fasa_seesaw contributors.
import logging
import torch
import torch.distributed as dist
from torch import nn

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..errors import ConfigError
from .fasa_fast_rcnn import FASAFastRCNNOutputLayers
from .normed_layers import NormedLinear
from .seesaw_loss import (
    check_seesaw_params,
    count_foreground,
    seesaw_cross_entropy,
    seesaw_losses,
    seesaw_probs,
)

__all__ = ["SeesawFastRCNNOutputLayers"]

logger = logging.getLogger(__name__)


class SeesawFastRCNNOutputLayers(FASAFastRCNNOutputLayers):
    """
    FastRCNNOutputLayers with the Seesaw C+2 classifier: C class logits trained with Seesaw Loss
    on foreground RoIs, plus a [foreground, background] objectness pair trained on all RoIs.

    The cumulative per-class foreground counts N are a persistent buffer, so they travel with
    checkpoints and a resumed run continues with the same mitigation factors. With
    ``sync_counts`` they are summed over all processes (detectron2 wraps the model with
    ``broadcast_buffers=False``, so nothing else would keep them equal).

    With FASA on (see :class:`FASAFastRCNNOutputLayers`), virtual features are trained with the
    same Seesaw class loss, against the counts of real RoIs only.
    """

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        p: float = 0.8,
        q: float = 2.0,
        eps: float = 1e-2,
        normed_classifier: bool = True,
        temperature: float = 20.0,
        sync_counts: bool = True,
        objectness_loss_weight: float = 1.0,
        **kwargs,
    ):
        """
        Args:
            p, q, eps: Seesaw mitigation / compensation exponents and the sigma_i clamp.
            normed_classifier: cosine classifier (with ``temperature``) for all C+2 outputs.
            sync_counts: sum class counts over processes; False keeps them per process.
            objectness_loss_weight: weight of the 2-way objectness loss.
            kwargs: as in :class:`FASAFastRCNNOutputLayers`; ``loss_weight["loss_cls"]`` weighs
                the Seesaw class loss.
        """
        if kwargs.get("use_sigmoid_ce") or kwargs.get("use_fed_loss"):
            raise ConfigError(
                "Seesaw Loss is a softmax loss and cannot be combined with "
                "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE or USE_FED_LOSS. Set both to False, or use "
                "detectron2's StandardROIHeads/CascadeROIHeads for the sigmoid/federated loss."
            )
        check_seesaw_params(p, q, eps)
        super().__init__(input_shape, **kwargs)
        in_features = self.cls_score.in_features
        if normed_classifier:
            self.cls_score = NormedLinear(
                in_features, self.num_classes + 2, temperature=temperature
            )
        else:
            self.cls_score = nn.Linear(in_features, self.num_classes + 2)
            nn.init.normal_(self.cls_score.weight, std=0.01)
            nn.init.constant_(self.cls_score.bias, 0)
        self.p, self.q, self.eps = float(p), float(q), float(eps)
        self.sync_counts = sync_counts
        self.loss_weight.setdefault("loss_cls_objectness", objectness_loss_weight)
        self.register_buffer("class_counts", torch.zeros(self.num_classes, dtype=torch.long))

    @classmethod
    def from_config(cls, cfg, input_shape, **kwargs):
        ret = super().from_config(cfg, input_shape)
        ret.update(kwargs)
        ret.update(
            {
                "p": cfg.MODEL.SEESAW.P,
                "q": cfg.MODEL.SEESAW.Q,
                "eps": cfg.MODEL.SEESAW.EPS,
                "normed_classifier": cfg.MODEL.SEESAW.NORMED_CLASSIFIER,
                "temperature": cfg.MODEL.SEESAW.TEMPERATURE,
                "sync_counts": cfg.MODEL.SEESAW.SYNC_COUNTS,
                "objectness_loss_weight": cfg.MODEL.SEESAW.OBJECTNESS_LOSS_WEIGHT,
            }
        )
        ret["loss_weight"] = dict(ret["loss_weight"], loss_cls=cfg.MODEL.SEESAW.LOSS_WEIGHT)
        return ret

    @torch.no_grad()
    def update_class_counts(self, gt_classes: torch.Tensor) -> None:
        """Add this batch's foreground RoIs (of every process, if synced) to the counts."""
        delta = count_foreground(gt_classes, self.num_classes, dtype=self.class_counts.dtype)
        if self.sync_counts and comm.get_world_size() > 1:
            dist.all_reduce(delta)
        self.class_counts += delta

    def real_losses(self, predictions, proposals):
        scores, proposal_deltas = predictions
        if len(proposals):
            gt_classes = cat([p.gt_classes for p in proposals], dim=0)
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
            gt_boxes = cat(
                [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals],
                dim=0,
            )
        else:
            gt_classes = torch.empty(0, dtype=torch.long, device=scores.device)
            proposal_boxes = gt_boxes = torch.empty((0, 4), device=proposal_deltas.device)

        # Counts must include the current batch before the loss is formed.
        self.update_class_counts(gt_classes)
        with torch.autocast(device_type=scores.device.type, enabled=False):
            loss_cls, loss_obj = seesaw_losses(
                scores, gt_classes, self.class_counts, self.p, self.q, self.eps
            )
        self._log_seesaw_stats(scores, gt_classes)
        losses = {
            "loss_cls": loss_cls,
            "loss_cls_objectness": loss_obj,
            "loss_box_reg": self.box_reg_loss(
                proposal_boxes, gt_boxes, proposal_deltas, gt_classes
            ),
        }
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    def per_roi_cls_loss(self, scores, gt_classes):
        """Seesaw CE with the current counts, which it does not change (background rows: any
        value, callers mask them). Virtual rows use it too, so they never enter the counts."""
        is_fg = gt_classes < self.num_classes
        labels = torch.where(is_fg, gt_classes, torch.zeros_like(gt_classes))
        with torch.autocast(device_type=scores.device.type, enabled=False):
            return seesaw_cross_entropy(
                scores[:, : self.num_classes], labels, self.class_counts, self.p, self.q, self.eps
            )

    def _log_seesaw_stats(self, scores, gt_classes, prefix="fast_rcnn"):
        """
        Objectness accuracy over all RoIs and class accuracy over foreground RoIs. Reading them
        for the EventStorage costs one device sync (the loss itself has none).
        """
        if gt_classes.numel() == 0:
            return
        C = self.num_classes
        with torch.no_grad():
            is_fg = gt_classes < C
            pred_fg = scores[:, C] > scores[:, C + 1]
            fg_correct = ((scores[:, :C].argmax(dim=1) == gt_classes) & is_fg).sum()
            obj_acc, num_fg, fg_correct = torch.stack(
                [(pred_fg == is_fg).float().mean(), is_fg.sum().float(), fg_correct.float()]
            ).tolist()
        storage = get_event_storage()
        storage.put_scalar(f"{prefix}/objectness_accuracy", obj_acc)
        if num_fg > 0:
            storage.put_scalar(f"{prefix}/fg_cls_accuracy", fg_correct / num_fg)

    def predict_probs(self, predictions, proposals):
        scores, _ = predictions
        num_inst_per_image = [len(p) for p in proposals]
        return seesaw_probs(scores).split(num_inst_per_image, dim=0)
