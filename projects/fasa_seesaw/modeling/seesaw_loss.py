# Copyright (c) fasa_seesaw contributors.
"""
Seesaw Loss (Wang et al., CVPR 2021) as plain torch functions.

Nothing here knows about detectron2: the predictor in ``seesaw_fast_rcnn.py`` owns the class-count
buffer and calls these functions. Every function is free of host-device syncs (no boolean
indexing, no ``.item()``, no ``bincount`` whose output size depends on the data), so the loss
can run inside a CUDA stream without stalling it.
"""

import math
import torch
from torch.nn import functional as F

from ..errors import ConfigError

__all__ = [
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
