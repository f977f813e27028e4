# Copyright (c) fasa_seesaw contributors.
"""
FASA (Zang et al., ICCV 2021) as one module: a per-class bank of classifier-input features of
positive RoIs, the per-class draw probabilities, the virtual features drawn from the bank, and the
collection of per-class validation losses that FASA's adaptation step reads.

A box predictor owns at most one :class:`FASA` (``predictor.fasa``) and hands it its classifier
input, its classifier and its per-RoI classification loss; nothing here knows which loss that is.
"""

import contextlib
from typing import Callable, Optional, Sequence
import torch
from torch import nn

from detectron2.utils.events import get_event_storage

from ..errors import ConfigError
from .fasa_feature_bank import ClassFeatureBank
from .fasa_feature_store import ClassFeatureStore
from .fasa_sampling import initial_probabilities, sample_virtual_features
from .feature_augment import (
    VirtualRows,
    check_augment_settings,
    mixed_loss,
    sample_moex,
    sample_smote,
)

__all__ = ["FASA", "fasa_from_config"]


class FASA(nn.Module):
    """
    Feature augmentation: after ``warmup_iters`` training iterations, each class is drawn with
    probability ``probs[c]`` and, if its bank entry has been seen, ``samples_per_class`` virtual
    features are drawn from N(mean_c, var_c) and classified; their loss, weighted by
    ``loss_weight``, trains the classifier only (never box regression, masks, or a loss's class
    counts).

    ``augmentation`` chooses how a drawn class's virtual feature is made: "gaussian" (FASA's),
    "smote" or "moex" (:mod:`.feature_augment`, from a :class:`ClassFeatureStore` of the last
    ``feature_memory`` real features per class, allocated only for them). The draw, the warm-up,
    the adaptation, the classifier-only path and the loss weight are the same for all three.

    State (checkpointed): the bank (``bank.mean``, ``bank.var``, ``bank.count``), ``probs`` and
    ``probs_initialized``; with SMOTE or MoEx the store (``store.features``, ``store.count``).
    ``probs`` is set from the training set's instance counts on the first training step, so a
    resumed run keeps its adapted values.
    """

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        *,
        loss_weight: float = 0.1,
        samples_per_class: int = 1,
        clamp_min_zero: bool = False,
        warmup_iters: int = -1,
        bank_mode: str = "ema",
        bank_momentum: float = 0.1,
        bank_variance: str = "sample",
        sync_bank: bool = True,
        init_probs: str = "inverse_frequency",
        instance_counts: Optional[Callable[[], Sequence[float]]] = None,
        epoch_iters: Optional[Callable[[], int]] = None,
        augmentation: str = "gaussian",
        feature_memory: int = 16,
        smote_k: int = 5,
        moex_lambda: float = 0.9,
        moex_prob: float = 1.0,
        moex_eps: float = 1e-5,
    ):
        """
        Args:
            num_classes, feature_dim: C and the classifier input's dimension D.
            loss_weight: weight of the virtual features' loss (``loss_fasa``).
            samples_per_class: virtual features per drawn class.
            clamp_min_zero: clamp virtual features at 0 (real ones come out of a ReLU).
            warmup_iters: iterations with bank updates only; -1: ``epoch_iters()``.
            bank_mode, bank_momentum, bank_variance, sync_bank: see :class:`ClassFeatureBank`.
            init_probs: "inverse_frequency" (from ``instance_counts()``) or "uniform".
            instance_counts: returns the training set's per-class instance counts.
            epoch_iters: returns the iterations of one epoch (the default warm-up).
            augmentation: "gaussian", "smote" or "moex".
            feature_memory: real features stored per class (SMOTE and MoEx).
            smote_k: SMOTE's neighbours.
            moex_lambda, moex_prob, moex_eps: MoEx's label weight of the drawn class, probability
                of exchanging, and the epsilon of its standard deviation.
        """
        super().__init__()
        check_augment_settings(
            augmentation, feature_memory, smote_k, moex_lambda, moex_prob, moex_eps
        )
        if augmentation == "moex" and feature_dim < 2:
            raise ConfigError("MoEx needs features with >= 2 channels for their moments.")
        self.augmentation = augmentation
        self.smote_k = int(smote_k)
        self.moex_lambda = float(moex_lambda)
        self.moex_prob = float(moex_prob)
        self.moex_eps = float(moex_eps)
        self.num_classes = num_classes
        self.loss_weight = float(loss_weight)
        self.samples_per_class = int(samples_per_class)
        self.clamp_min_zero = bool(clamp_min_zero)
        self.init_probs = init_probs
        self._warmup_iters = int(warmup_iters)
        self._instance_counts = instance_counts
        self._epoch_iters = epoch_iters
        self.bank = ClassFeatureBank(
            num_classes,
            feature_dim,
            mode=bank_mode,
            momentum=bank_momentum,
            sync=sync_bank,
            variance=bank_variance,
        )
        self.store = (
            ClassFeatureStore(num_classes, feature_dim, feature_memory, sync=sync_bank)
            if augmentation != "gaussian"
            else None
        )
        self.register_buffer("probs", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("probs_initialized", torch.zeros((), dtype=torch.bool))
        self._probs_ready = False
        # (loss sums, RoI counts) while a validation pass collects; None otherwise.
        self._collected = None

    # ------------------------------------------------------------------ settings
    @property
    def warmup_iters(self) -> int:
        """The warm-up in iterations; -1 resolves, once, to one epoch of the training set
        (deterministic, so a resumed run computes the same value)."""
        if self._warmup_iters < 0:
            if self._epoch_iters is None:
                raise ConfigError("FASA's default warm-up needs the epoch length; none was given.")
            self._warmup_iters = int(self._epoch_iters())
        return self._warmup_iters

    def initialize_probs(self) -> None:
        """Set ``probs`` from the training set's instance counts (``init_probs``)."""
        if self._instance_counts is None:
            raise ConfigError("FASA needs the training set's instance counts; none were given.")
        counts = self._instance_counts()
        if len(counts) != self.num_classes:
            raise ConfigError(
                f"FASA got {len(counts)} class instance counts for {self.num_classes} classes; "
                "MODEL.ROI_HEADS.NUM_CLASSES must match the training dataset."
            )
        p = initial_probabilities(counts, self.init_probs)
        self.probs.copy_(torch.as_tensor(p, dtype=self.probs.dtype))
        self.probs_initialized.fill_(True)

    # ------------------------------------------------------------------ validation losses
    @property
    def collecting(self) -> bool:
        return self._collected is not None

    @contextlib.contextmanager
    def collect_val_losses(self):
        """
        Inside, the owning predictor's training forwards add each sampled RoI's classification
        loss and count to per-class tensors (:meth:`collect`), update no statistic and return no
        loss. Yields ``(sums, counts)``, float64 of length C + 1: ``counts`` counts every sampled
        RoI, background in slot C (the reference's normaliser); ``sums`` holds the foreground
        losses (slot C stays 0: the background loss enters no group).
        """
        n = self.num_classes + 1
        device = self.probs.device
        collected = (
            torch.zeros(n, dtype=torch.float64, device=device),
            torch.zeros(n, dtype=torch.float64, device=device),
        )
        self._collected = collected
        try:
            with self.paused():
                yield collected
        finally:
            self._collected = None

    @contextlib.contextmanager
    def paused(self):
        """Inside, neither the bank nor the store (if any) changes."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.bank.paused())
            if self.store is not None:
                stack.enter_context(self.store.paused())
            yield self

    def collect(self, per_roi_loss: torch.Tensor, gt_classes: torch.Tensor) -> None:
        """Add one batch's per-RoI losses (background rows: any value, masked here)."""
        sums, counts = self._collected
        is_fg = gt_classes < self.num_classes
        per_roi = per_roi_loss.float() * is_fg
        sums.index_add_(0, gt_classes, per_roi.to(sums.dtype))
        counts.index_add_(0, gt_classes, torch.ones_like(gt_classes, dtype=counts.dtype))

    # ------------------------------------------------------------------ training
    def loss(
        self,
        features: torch.Tensor,
        gt_classes: torch.Tensor,
        classifier: nn.Module,
        per_roi_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """
        Update the bank with this batch's classifier inputs and return ``loss_fasa``: the
        weighted mean over drawn rows of ``per_roi_loss(classifier(virtual), labels)`` (0 during
        the warm-up or when nothing is drawn).
        """
        if not self._probs_ready:
            # Read the buffer once (it may come from a checkpoint), not every step.
            if not bool(self.probs_initialized):
                self.initialize_probs()
            self._probs_ready = True
        self.bank.update(features, gt_classes)
        if self.store is not None:
            self.store.update(features, gt_classes)
        storage = get_event_storage()
        if storage.iter < self.warmup_iters:
            return features.sum() * 0.0
        rows = self.virtual_rows()
        feats, labels, weight = rows.features, rows.labels, rows.weight
        logits = classifier(feats.to(features.dtype))
        if rows.labels_b is None:
            per_row = per_roi_loss(logits, labels)
        else:
            per_row = mixed_loss(per_roi_loss, logits, labels, rows.labels_b, rows.lam)
        loss = (per_row * weight).sum() / weight.sum().clamp(min=1.0)
        storage.put_scalar("fasa/num_virtual", weight.sum().item(), smoothing_hint=False)
        return loss * self.loss_weight

    def virtual_rows(self) -> VirtualRows:
        """This step's virtual features, labels and weights, from the bank or the store."""
        k = self.samples_per_class
        if self.augmentation == "gaussian":
            bank = self.bank
            feats, labels, weight = sample_virtual_features(
                bank.mean,
                bank.var,
                bank.seen,
                self.probs,
                k,
                clamp_min=0.0 if self.clamp_min_zero else None,
            )
            return VirtualRows(feats, labels, weight)
        store = self.store
        if self.augmentation == "smote":
            rows = sample_smote(store.features, store.size, self.probs, k, self.smote_k)
        else:
            rows = sample_moex(
                store.features,
                store.size,
                self.probs,
                k,
                lam=self.moex_lambda,
                prob=self.moex_prob,
                eps=self.moex_eps,
            )
        if self.clamp_min_zero:
            rows = rows._replace(features=rows.features.clamp(min=0.0))
        return rows

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, loss_weight={self.loss_weight}, "
            f"samples_per_class={self.samples_per_class}, warmup_iters={self._warmup_iters}, "
            f"augmentation={self.augmentation}"
        )


def fasa_from_config(cfg, feature_dim: int) -> Optional[FASA]:
    """The :class:`FASA` of a box predictor from MODEL.FASA; None when it is off."""
    if not cfg.MODEL.FASA.ENABLED:
        return None
    from ..data.counts import epoch_iterations, instance_counts_of

    c = cfg.MODEL.FASA
    names = tuple(cfg.DATASETS.TRAIN)
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    ims_per_batch = cfg.SOLVER.IMS_PER_BATCH
    return FASA(
        num_classes,
        feature_dim,
        loss_weight=c.LOSS_WEIGHT,
        samples_per_class=c.SAMPLES_PER_CLASS,
        clamp_min_zero=c.CLAMP_MIN_ZERO,
        warmup_iters=c.WARMUP_ITERS,
        bank_mode=c.BANK_MODE,
        bank_momentum=c.BANK_MOMENTUM,
        bank_variance=c.BANK_VARIANCE,
        sync_bank=c.SYNC_BANK,
        init_probs=c.INIT_PROBS,
        instance_counts=lambda: instance_counts_of(names, num_classes),
        epoch_iters=lambda: epoch_iterations(names, ims_per_batch, num_classes),
        augmentation=c.AUGMENTATION,
        feature_memory=c.FEATURE_MEMORY,
        smote_k=c.SMOTE_K,
        moex_lambda=c.MOEX_LAMBDA,
        moex_prob=c.MOEX_PROB,
        moex_eps=c.MOEX_EPS,
    )
