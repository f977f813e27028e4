# Copyright (c) fasa_seesaw contributors.
"""
FastRCNNOutputLayers with FASA (Zang et al., ICCV 2021): a per-class bank of classifier-input
features of positive RoIs, and virtual features drawn from it that train the classifier only.
"""

import contextlib
import logging
from typing import Callable, Optional
import torch
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.utils.events import get_event_storage

from ..errors import ConfigError
from .fasa_feature_bank import ClassFeatureBank
from .fasa_sampling import initial_probabilities, sample_virtual_features

__all__ = ["FASAFastRCNNOutputLayers"]

logger = logging.getLogger(__name__)


class FASAFastRCNNOutputLayers(FastRCNNOutputLayers):
    """
    With ``fasa=None`` this is detectron2's FastRCNNOutputLayers. With a ``fasa`` dict it also:

    - caches the classifier input of the current training forward (the smallest hook into the
      data path: ROI heads need no change);
    - updates the feature bank with the positive RoIs' features (real labels only);
    - after ``warmup_iters`` adds ``loss_fasa``: the classification loss of virtual features,
      drawn per class with probability ``fasa_probs`` and weighted by ``loss_weight``. The loss
      is the same kind as the real RoIs' (``virtual_cls_loss``); virtual features never reach
      box regression, masks or Seesaw's class counts.

    ``fasa_probs`` is a persistent buffer set from the training set's instance counts on the
    first training step (so a resumed run keeps its adapted values).
    """

    @configurable
    def __init__(self, input_shape, *, fasa: Optional[dict] = None, **kwargs):
        """
        Args:
            fasa (dict or None): keys loss_weight, samples_per_class, clamp_min_zero,
                warmup_iters, bank_mode, bank_momentum, bank_variance, sync, init_probs, and
                ``instance_counts`` (a callable returning per-class training instance counts).
            kwargs: as in :class:`FastRCNNOutputLayers`.
        """
        super().__init__(input_shape, **kwargs)
        self.fasa = None
        # (loss sums, RoI counts) per class + background slot while FASA's validation pass
        # collects (see collect_val_losses); None otherwise.
        self.val_collect = None
        if fasa is None:
            return
        if (
            not isinstance(input_shape, int)
            and (input_shape.height or 1) * (input_shape.width or 1) > 1
        ):
            raise ConfigError(
                "FASA models the box head's last fully-connected feature, but this box head "
                f"outputs a {input_shape.channels}x{input_shape.height}x{input_shape.width} map. "
                "Use a box head with fully-connected layers (MODEL.ROI_BOX_HEAD.NUM_FC >= 1), "
                "or set MODEL.FASA.ENABLED False."
            )
        self.fasa = dict(fasa)
        self._instance_counts: Optional[Callable] = self.fasa.pop("instance_counts", None)
        self._epoch_iters: Optional[Callable] = self.fasa.pop("epoch_iters", None)
        dim = self.cls_score.in_features
        self.fasa_bank = ClassFeatureBank(
            self.num_classes,
            dim,
            mode=self.fasa["bank_mode"],
            momentum=self.fasa["bank_momentum"],
            sync=self.fasa["sync"],
            variance=self.fasa.get("bank_variance", "sample"),
        )
        self.register_buffer("fasa_probs", torch.full((self.num_classes,), 1.0 / self.num_classes))
        self.register_buffer("fasa_probs_initialized", torch.zeros((), dtype=torch.bool))
        self._fasa_input = None
        self._probs_ready = False

    @classmethod
    def from_config(cls, cfg, input_shape, **kwargs):
        ret = super().from_config(cfg, input_shape)
        ret.update(kwargs)
        ret["fasa"] = fasa_config(cfg) if cfg.MODEL.FASA.ENABLED else None
        return ret

    def forward(self, x):
        if self.fasa is not None and self.training:
            self._fasa_input = torch.flatten(x, start_dim=1) if x.dim() > 2 else x
        return super().forward(x)

    def losses(self, predictions, proposals):
        if self.val_collect is not None:
            self._collect_val_loss(predictions[0], proposals)
            self._fasa_input = None
            return {}  # the validation pass changes no statistic and trains nothing
        losses = self.real_losses(predictions, proposals)
        if self.fasa is not None and self._fasa_input is not None:
            gt_classes = (
                cat([p.gt_classes for p in proposals], dim=0)
                if len(proposals)
                else torch.empty(0, dtype=torch.long, device=predictions[0].device)
            )
            losses["loss_fasa"] = self.fasa_losses(self._fasa_input, gt_classes)
            self._fasa_input = None
        return losses

    def real_losses(self, predictions, proposals):
        """The losses of the real RoIs; subclasses with another classification loss override it."""
        return super().losses(predictions, proposals)

    def per_roi_cls_loss(self, scores, gt_classes):
        """Per-RoI classification loss (R,) of the kind used in training; only foreground used."""
        if self.use_sigmoid_ce:
            target = F.one_hot(gt_classes, self.num_classes + 1)[:, : self.num_classes].to(scores)
            return F.binary_cross_entropy_with_logits(scores[:, :-1], target, reduction="none").sum(
                dim=1
            )
        return F.cross_entropy(scores.float(), gt_classes, reduction="none")

    @contextlib.contextmanager
    def collect_val_losses(self):
        """
        Inside, training forwards add each sampled RoI's classification loss and count to
        per-class tensors, update no statistic and return no loss. Yields ``(sums, counts)``,
        float64 of length C + 1: ``counts`` counts every sampled RoI, background in slot C (the
        reference's normaliser); ``sums`` holds the foreground losses (slot C stays 0: the
        background loss enters no group).
        """
        n = self.num_classes + 1
        device = self.cls_score.weight.device
        collected = (
            torch.zeros(n, dtype=torch.float64, device=device),
            torch.zeros(n, dtype=torch.float64, device=device),
        )
        self.val_collect = collected
        try:
            with self.fasa_bank.paused():
                yield collected
        finally:
            self.val_collect = None

    def _collect_val_loss(self, scores, proposals):
        C = self.num_classes
        if not len(proposals):
            return
        gt = cat([p.gt_classes for p in proposals], dim=0)
        is_fg = gt < C
        per_roi = self.per_roi_cls_loss(scores, gt).float() * is_fg
        sums, counts = self.val_collect
        sums.index_add_(0, gt, per_roi.to(sums.dtype))
        counts.index_add_(0, gt, torch.ones_like(gt, dtype=counts.dtype))

    def virtual_cls_loss(self, logits, labels, weight):
        """
        Weighted mean over drawn rows of the loss the real RoIs use (``per_roi_cls_loss``;
        federated class sampling is not applied to virtual rows).
        """
        per_row = self.per_roi_cls_loss(logits, labels)
        return (per_row * weight).sum() / weight.sum().clamp(min=1.0)

    def initialize_fasa_probs(self):
        if self._instance_counts is None:
            raise ConfigError("FASA needs the training set's instance counts; none were given.")
        counts = self._instance_counts()
        if len(counts) != self.num_classes:
            raise ConfigError(
                f"FASA got {len(counts)} class instance counts for {self.num_classes} classes; "
                "MODEL.ROI_HEADS.NUM_CLASSES must match the training dataset."
            )
        p = initial_probabilities(counts, self.fasa["init_probs"])
        self.fasa_probs.copy_(torch.as_tensor(p, dtype=self.fasa_probs.dtype))
        self.fasa_probs_initialized.fill_(True)

    def fasa_losses(self, features, gt_classes):
        if not self._probs_ready:
            # Read the buffer once (it may come from a checkpoint), not every step.
            if not bool(self.fasa_probs_initialized):
                self.initialize_fasa_probs()
            self._probs_ready = True
        self.fasa_bank.update(features, gt_classes)
        if self.fasa["warmup_iters"] < 0:
            # Default warm-up: one epoch of the training set (deterministic, so a resumed run
            # computes the same value).
            self.fasa["warmup_iters"] = self._epoch_iters()
        storage = get_event_storage()
        if storage.iter < self.fasa["warmup_iters"]:
            return features.sum() * 0.0
        bank = self.fasa_bank
        feats, labels, weight = sample_virtual_features(
            bank.mean,
            bank.var,
            bank.seen,
            self.fasa_probs,
            self.fasa["samples_per_class"],
            clamp_min=0.0 if self.fasa["clamp_min_zero"] else None,
        )
        logits = self.cls_score(feats.to(features.dtype))
        loss = self.virtual_cls_loss(logits, labels, weight)
        storage.put_scalar("fasa/num_virtual", weight.sum().item(), smoothing_hint=False)
        return loss * self.fasa["loss_weight"]


def fasa_config(cfg) -> dict:
    """The ``fasa`` argument of the predictors, from MODEL.FASA."""
    from ..data.counts import epoch_iterations, instance_counts_of

    c = cfg.MODEL.FASA
    names = tuple(cfg.DATASETS.TRAIN)
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    return {
        "loss_weight": c.LOSS_WEIGHT,
        "samples_per_class": c.SAMPLES_PER_CLASS,
        "clamp_min_zero": c.CLAMP_MIN_ZERO,
        "warmup_iters": c.WARMUP_ITERS,
        "bank_mode": c.BANK_MODE,
        "bank_momentum": c.BANK_MOMENTUM,
        "bank_variance": c.BANK_VARIANCE,
        "sync": c.SYNC,
        "init_probs": c.INIT_PROBS,
        "instance_counts": lambda: instance_counts_of(names, num_classes),
        "epoch_iters": lambda: epoch_iterations(names, cfg.SOLVER.IMS_PER_BATCH, num_classes),
    }
