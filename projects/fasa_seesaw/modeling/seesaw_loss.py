# Copyright (c) fasa_seesaw contributors.
"""
Seesaw Loss (Wang et al., CVPR 2021): the math as plain torch functions, and :class:`SeesawLoss`,
the module a box predictor holds (the class-count buffer, the loss and the test-time activation,
shaped like mmdetection's ``SeesawLoss``).

Every function is free of host-device syncs (no boolean indexing, no ``.item()``, no
``bincount`` whose output size depends on the data), so the loss can run inside a CUDA stream
without stalling it.
"""

import math
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..errors import ConfigError

__all__ = [
    "SeesawLoss",
    "check_seesaw_params",
    "count_foreground",
    "seesaw_logit_offsets",
    "seesaw_cross_entropy",
    "seesaw_losses",
    "seesaw_probs",
]


def check_seesaw_params(p: float, q: float, eps: float) -> None:
    """Raise a ValueError that says which hyper-parameter is wrong and what is allowed."""
    for name, value in (("p", p), ("q", q)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (math.isfinite(value) and value >= 0)
        ):
            raise ConfigError(
                f"Seesaw Loss: {name}={value!r} is invalid; it must be a finite number >= 0 "
                f"(MODEL.SEESAW.{name.upper()}; the paper uses p=0.8, q=2.0, and 0 switches "
                "that factor off)."
            )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0.0 < eps <= 1.0):
        raise ConfigError(
            f"Seesaw Loss: eps={eps!r} is invalid; it must lie in (0, 1] "
            "(MODEL.SEESAW.EPS; the paper uses 0.01)."
        )


def count_foreground(gt_classes: torch.Tensor, num_classes: int, dtype=torch.long) -> torch.Tensor:
    """
    Per-class number of foreground RoIs in ``gt_classes`` (labels in [0, num_classes], where
    ``num_classes`` is background). Background is scattered into an extra slot that is dropped,
    which keeps the shape static and avoids a sync.
    """
    out = torch.zeros(num_classes + 1, dtype=dtype, device=gt_classes.device)
    out.index_add_(0, gt_classes.long(), torch.ones_like(gt_classes, dtype=dtype))
    return out[:num_classes]


def seesaw_logit_offsets(
    cls_logits: torch.Tensor,
    labels: torch.Tensor,
    class_counts: torch.Tensor,
    p: float,
    q: float,
    eps: float,
) -> torch.Tensor:
    """
    log(S_ij) for every sample (row, ground-truth class i) and every class j, zero at j == i.

    S_ij = M_ij * C_ij with mitigation M_ij = min(N_j / N_i, 1)^p and compensation
    C_ij = max(sigma_j / max(sigma_i, eps), 1)^q. Worked in log space, in one buffer updated in
    place: log M_ij = p * min(log N_j - log N_i, 0) and
    log C_ij = q * max(log sigma_j - max(log sigma_i, log eps), 0). Both vanish at j == i by
    construction, so the ground-truth logit is untouched. Only the R x C entries the batch needs
    are formed, instead of the C x C matrix of the reference code.

    Args:
        cls_logits: (R, C) class logits (no objectness columns).
        labels: (R,) ground-truth classes in [0, C).
        class_counts: (C,) cumulative foreground counts.
    """
    logits = cls_logits.detach().float()
    if q > 0:
        log_sigma = F.log_softmax(logits, dim=1)
        log_self = log_sigma.gather(1, labels[:, None]).clamp_(min=math.log(eps))
        offsets = log_sigma.sub_(log_self).clamp_(min=0.0).mul_(q)
    else:
        offsets = torch.zeros_like(logits)
    if p > 0:
        log_n = class_counts.to(logits.dtype).clamp(min=1).log()
        offsets.add_((log_n[None, :] - log_n[labels][:, None]).clamp_(max=0.0).mul_(p))
    return offsets


def seesaw_cross_entropy(
    cls_logits: torch.Tensor,
    labels: torch.Tensor,
    class_counts: torch.Tensor,
    p: float = 0.8,
    q: float = 2.0,
    eps: float = 1e-2,
) -> torch.Tensor:
    """Per-sample Seesaw CE: ordinary CE on logits z_j + log(S_ij). Returns shape (R,)."""
    logits = cls_logits.float()
    offsets = seesaw_logit_offsets(logits, labels, class_counts, p, q, eps)
    return F.cross_entropy(offsets.add_(logits), labels, reduction="none")


def seesaw_losses(
    logits: torch.Tensor,
    gt_classes: torch.Tensor,
    class_counts: torch.Tensor,
    p: float = 0.8,
    q: float = 2.0,
    eps: float = 1e-2,
):
    """
    Class and objectness losses of the C+2 Seesaw classifier.

    Args:
        logits: (R, C+2); the last two columns are [foreground, background].
        gt_classes: (R,) in [0, C], C meaning background.
        class_counts: (C,) counts that already include this batch.

    Returns:
        (loss_cls, loss_objectness): Seesaw CE summed over foreground RoIs and 2-way CE summed
        over all RoIs, both divided by the number of sampled RoIs R. Both are 0 (with a graph)
        when R == 0.
    """
    num_classes = logits.shape[1] - 2
    num_rois = max(logits.shape[0], 1)
    logits = logits.float()
    cls_logits, obj_logits = logits[:, :num_classes], logits[:, num_classes:]
    is_fg = gt_classes < num_classes
    # Background rows get a dummy label and are zeroed by the mask: no data-dependent shapes.
    safe_labels = torch.where(is_fg, gt_classes, torch.zeros_like(gt_classes))
    per_roi = seesaw_cross_entropy(cls_logits, safe_labels, class_counts, p, q, eps)
    loss_cls = (per_roi * is_fg.to(per_roi.dtype)).sum() / num_rois
    obj_labels = (~is_fg).long()  # 0 = foreground, 1 = background
    loss_obj = F.cross_entropy(obj_logits, obj_labels, reduction="sum") / num_rois
    return loss_cls, loss_obj


def seesaw_probs(logits: torch.Tensor) -> torch.Tensor:
    """
    Test-time scores [softmax(class logits) * P_fg, P_bg], shape (R, C+1), rows summing to 1,
    laid out like detectron2's softmax scores so its inference and cascade averaging work.
    """
    num_classes = logits.shape[1] - 2
    logits = logits.float()
    cls = F.softmax(logits[:, :num_classes], dim=1)
    obj = F.softmax(logits[:, num_classes:], dim=1)
    return torch.cat([cls * obj[:, :1], obj[:, 1:]], dim=1)


class SeesawLoss(nn.Module):
    """
    The classification loss of a box predictor with the Seesaw C+2 classifier: C class logits
    trained with Seesaw CE on foreground RoIs, plus a [foreground, background] objectness pair
    trained on all RoIs.

    The cumulative per-class foreground counts N are a persistent buffer (``class_counts``), so
    they travel with checkpoints and a resumed run continues with the same mitigation factors.
    With ``sync_counts`` they are summed over all processes (detectron2 wraps the model with
    ``broadcast_buffers=False``, so nothing else would keep them equal).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        p: float = 0.8,
        q: float = 2.0,
        eps: float = 1e-2,
        loss_weight: float = 1.0,
        objectness_loss_weight: float = 1.0,
        sync_counts: bool = True,
    ):
        """
        Args:
            p, q, eps: mitigation / compensation exponents and the sigma_i clamp.
            loss_weight, objectness_loss_weight: weights of ``loss_cls`` and
                ``loss_cls_objectness``.
            sync_counts: sum class counts over processes; False keeps them per process.
        """
        super().__init__()
        check_seesaw_params(p, q, eps)
        self.num_classes = num_classes
        self.p, self.q, self.eps = float(p), float(q), float(eps)
        self.loss_weight = loss_weight
        self.objectness_loss_weight = objectness_loss_weight
        self.sync_counts = sync_counts
        self.register_buffer("class_counts", torch.zeros(num_classes, dtype=torch.long))

    @property
    def num_logits(self) -> int:
        """Outputs the classifier needs: C classes + [foreground, background]."""
        return self.num_classes + 2

    @torch.no_grad()
    def update_counts(self, gt_classes: torch.Tensor) -> None:
        """Add this batch's foreground RoIs (of every process, if synced) to the counts."""
        delta = count_foreground(gt_classes, self.num_classes, dtype=self.class_counts.dtype)
        if self.sync_counts and comm.get_world_size() > 1:
            dist.all_reduce(delta)
        self.class_counts += delta

    def forward(self, scores: torch.Tensor, gt_classes: torch.Tensor) -> dict:
        """Counts this batch, then returns the weighted ``loss_cls`` and ``loss_cls_objectness``."""
        # Counts must include the current batch before the loss is formed.
        self.update_counts(gt_classes)
        with torch.autocast(device_type=scores.device.type, enabled=False):
            loss_cls, loss_obj = seesaw_losses(
                scores, gt_classes, self.class_counts, self.p, self.q, self.eps
            )
        self.log_stats(scores, gt_classes)
        return {
            "loss_cls": loss_cls * self.loss_weight,
            "loss_cls_objectness": loss_obj * self.objectness_loss_weight,
        }

    def per_roi(self, scores: torch.Tensor, gt_classes: torch.Tensor) -> torch.Tensor:
        """Seesaw CE with the current counts, which it does not change (background rows: any
        value, callers mask them). FASA's virtual rows use it, so they never enter the counts."""
        is_fg = gt_classes < self.num_classes
        labels = torch.where(is_fg, gt_classes, torch.zeros_like(gt_classes))
        with torch.autocast(device_type=scores.device.type, enabled=False):
            return seesaw_cross_entropy(
                scores[:, : self.num_classes], labels, self.class_counts, self.p, self.q, self.eps
            )

    def activation(self, scores: torch.Tensor) -> torch.Tensor:
        """Test-time (R, C+1) scores laid out like detectron2's softmax (:func:`seesaw_probs`)."""
        return seesaw_probs(scores)

    def log_stats(self, scores, gt_classes, prefix="fast_rcnn"):
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

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, p={self.p}, q={self.q}, eps={self.eps}, "
            f"sync_counts={self.sync_counts}"
        )
