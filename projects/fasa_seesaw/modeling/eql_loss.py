# Copyright (c) fasa_seesaw contributors.
"""
Equalization Loss (Tan et al., CVPR 2020): the math as plain torch functions, and
:class:`EQLLoss`, the module a box predictor holds (the class-frequency buffer, the loss and the
test-time activation), following the official code (tztztztztz/eql.detectron2,
projects/EQL/eql/fast_rcnn.py; the same rules in tztztztztz/eqlv2, mmdet/models/losses/eql.py).

Sigmoid cross-entropy over the C class logits, where a foreground RoI ignores the negative terms
of tail classes: w_j = 1 - E(r) T_lambda(f_j) (1 - y_j), E(r) = 1 for foreground RoIs and 0 for
background ones, T_lambda(f) = 1 if f < lambda. f_j is the class's image frequency in the
training set (:func:`fasa_seesaw.data.counts.image_frequency_of`).

The helpers shared with EQLv2 (sigmoid targets, the prior-probability bias, the accuracy line)
live here too.
"""

import math
from typing import Callable, Optional, Sequence
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.utils.events import get_event_storage

from ..errors import ConfigError

__all__ = [
    "EQLLoss",
    "check_prior_prob",
    "eql_loss",
    "eql_per_roi",
    "eql_tail_classes",
    "eql_weights",
    "init_prior_bias",
    "log_class_accuracy",
    "sigmoid_probs",
    "sigmoid_targets",
]


def check_prior_prob(key: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ConfigError(
            f"{key}={value!r} is invalid; it must lie in (0, 1) (the official code uses 0.001; "
            "0.5 gives detectron2's zero bias)."
        )


def sigmoid_targets(gt_classes: torch.Tensor, num_columns: int, dtype=torch.float32):
    """
    One-hot targets (R, num_columns) for labels in [0, C] (C: background). With
    ``num_columns == C`` a background row is all zeros (EQL); with ``C + 1`` its last column is 1
    (EQLv2's objectness column).
    """
    target = torch.zeros(
        gt_classes.shape[0], num_columns + 1, dtype=dtype, device=gt_classes.device
    )
    target.scatter_(1, gt_classes.long()[:, None], 1.0)
    return target[:, :num_columns]


def eql_tail_classes(frequency: torch.Tensor, lambda_: float) -> torch.Tensor:
    """T_lambda(f_j): True for the classes whose frequency is below lambda (strictly)."""
    return frequency < lambda_


def eql_weights(gt_classes: torch.Tensor, tail: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """w_rj = 1 - E(r) T_lambda(f_j) (1 - y_rj), shape (R, C); E(r) = 1 for foreground rows."""
    num_classes = tail.shape[0]
    target = sigmoid_targets(gt_classes, num_classes, dtype)
    is_fg = (gt_classes < num_classes).to(dtype)[:, None]
    return 1.0 - is_fg * tail.to(dtype)[None, :] * (1.0 - target)


def eql_per_roi(cls_logits: torch.Tensor, gt_classes: torch.Tensor, tail: torch.Tensor):
    """Per-RoI EQL: sum over the C classes of w_rj * BCE(z_rj, y_rj). Returns shape (R,)."""
    logits = cls_logits.float()
    target = sigmoid_targets(gt_classes, tail.shape[0], logits.dtype)
    weight = eql_weights(gt_classes, tail, logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * weight).sum(dim=1)


def eql_loss(cls_logits: torch.Tensor, gt_classes: torch.Tensor, tail: torch.Tensor):
    """EQL summed over RoIs and classes, divided by the number of RoIs (0 when there are none)."""
    return eql_per_roi(cls_logits, gt_classes, tail).sum() / max(cls_logits.shape[0], 1)


def sigmoid_probs(cls_logits: torch.Tensor) -> torch.Tensor:
    """[sigmoid(z_1..C), 0]: (R, C+1) test scores with a zero background column, as the official
    EQL code's ``predict_probs`` (detectron2's inference reads only the first C columns)."""
    probs = cls_logits.float().sigmoid()
    return torch.cat([probs, probs.new_zeros(probs.shape[0], 1)], dim=1)


def init_prior_bias(layer: nn.Module, prior_prob: float) -> None:
    """Set the classifier's bias to -log((1 - p) / p) (sigmoid(bias) = p), as the official EQL
    and EQLv2 code initialise their sigmoid classifiers; a layer without bias is left alone."""
    bias = getattr(layer, "bias", None)
    if bias is not None:
        nn.init.constant_(bias, -math.log((1.0 - prior_prob) / prior_prob))


def log_class_accuracy(cls_logits, gt_classes, prefix="fast_rcnn"):
    """``fg_cls_accuracy``: argmax of the C class logits on foreground RoIs (one device sync)."""
    if gt_classes.numel() == 0:
        return
    C = cls_logits.shape[1]
    with torch.no_grad():
        is_fg = gt_classes < C
        correct = ((cls_logits.argmax(dim=1) == gt_classes) & is_fg).sum()
        num_fg, correct = torch.stack([is_fg.sum().float(), correct.float()]).tolist()
    if num_fg > 0:
        get_event_storage().put_scalar(f"{prefix}/fg_cls_accuracy", correct / num_fg)


class EQLLoss(nn.Module):
    """
    The classification loss of a box predictor with detectron2's sigmoid layout: C + 1 logits,
    the last one unused (as detectron2's sigmoid CE leaves it), the C class logits trained with
    EQL on every sampled RoI.

    The class frequencies are a persistent buffer (``frequency``, with ``frequency_initialized``),
    set from the training datasets on first use (``image_frequency()``), so checkpoints carry them
    and a resumed or evaluated model never needs the training set again.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        lambda_: float = 0.0011,
        loss_weight: float = 1.0,
        prior_prob: float = 0.001,
        image_frequency: Optional[Callable[[], Sequence[float]]] = None,
    ):
        """
        Args:
            lambda_: tail threshold on the frequency (T_lambda(f) = 1 if f < lambda).
            loss_weight: weight of ``loss_cls``.
            prior_prob: initial sigmoid probability of every class (classifier bias).
            image_frequency: returns the training set's per-class image frequencies.
        """
        super().__init__()
        if isinstance(lambda_, bool) or not isinstance(lambda_, (int, float)) or lambda_ < 0:
            raise ConfigError(
                f"EQL: lambda={lambda_!r} is invalid; it must be a number >= 0 (MODEL.EQL.LAMBDA; "
                "the official code uses 0.0011 on LVIS v1 and 0.00177 on LVIS v0.5)."
            )
        check_prior_prob("MODEL.EQL.PRIOR_PROB", prior_prob)
        self.num_classes = num_classes
        self.lambda_ = float(lambda_)
        self.loss_weight = loss_weight
        self.prior_prob = float(prior_prob)
        self._image_frequency = image_frequency
        self.register_buffer("frequency", torch.zeros(num_classes))
        self.register_buffer("frequency_initialized", torch.zeros((), dtype=torch.bool))
        self._frequency_ready = False

    @property
    def num_logits(self) -> int:
        """detectron2's sigmoid layout: C classes + one unused column."""
        return self.num_classes + 1

    def init_classifier(self, layer: nn.Module) -> None:
        init_prior_bias(layer, self.prior_prob)

    def initialize_frequency(self) -> None:
        """Set ``frequency`` from the training datasets (``image_frequency()``)."""
        if self._image_frequency is None:
            raise ConfigError("EQL needs the training set's class frequencies; none were given.")
        freq = torch.as_tensor(self._image_frequency(), dtype=self.frequency.dtype)
        if freq.shape != (self.num_classes,):
            raise ConfigError(
                f"EQL got {freq.numel()} class frequencies for {self.num_classes} classes; "
                "MODEL.ROI_HEADS.NUM_CLASSES must match the training dataset."
            )
        self.frequency.copy_(freq)
        self.frequency_initialized.fill_(True)

    def tail_classes(self) -> torch.Tensor:
        """T_lambda(f_j) for every class, the frequencies set on first use."""
        if not self._frequency_ready:
            # Read the buffer once (it may come from a checkpoint), not every step.
            if not bool(self.frequency_initialized):
                self.initialize_frequency()
            self._frequency_ready = True
        return eql_tail_classes(self.frequency, self.lambda_)

    def forward(self, scores: torch.Tensor, gt_classes: torch.Tensor) -> dict:
        cls_logits = scores[:, : self.num_classes]
        with torch.autocast(device_type=scores.device.type, enabled=False):
            loss = eql_loss(cls_logits, gt_classes, self.tail_classes())
        log_class_accuracy(cls_logits, gt_classes)
        return {"loss_cls": loss * self.loss_weight}

    def per_roi(self, scores: torch.Tensor, gt_classes: torch.Tensor) -> torch.Tensor:
        """Per-RoI EQL (sum over classes); changes nothing but the first-use frequencies."""
        with torch.autocast(device_type=scores.device.type, enabled=False):
            return eql_per_roi(scores[:, : self.num_classes], gt_classes, self.tail_classes())

    def activation(self, scores: torch.Tensor) -> torch.Tensor:
        """Test-time (R, C+1) scores: sigmoid class scores and a zero background column."""
        return sigmoid_probs(scores[:, : self.num_classes])

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, lambda={self.lambda_}, "
            f"loss_weight={self.loss_weight}, prior_prob={self.prior_prob}"
        )
