# Copyright (c) fasa_seesaw contributors.
"""
FASA's sampling adaptation as a detectron2 hook: every ``period`` iterations, a validation-loss
pass on held-out data, per-class classification losses reduced over processes, classes grouped
by clustering their feature means, and each group's draw probability moved up if its loss fell
and down if it rose.
"""

import logging
import numpy as np
from typing import Callable, List, Optional
import torch
import torch.distributed as dist

from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_test_loader
from detectron2.data import transforms as T
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

from ..errors import ConfigError
from ..modeling.fasa_fast_rcnn import FASAFastRCNNOutputLayers
from ..modeling.fasa_sampling import adapt_probabilities

__all__ = ["FASAAdaptationHook", "cluster_classes", "fasa_predictors"]

logger = logging.getLogger(__name__)

CLUSTERING = ("meanshift", "affinity", "none")


def fasa_predictors(model) -> List[FASAFastRCNNOutputLayers]:
    model = model.module if hasattr(model, "module") else model
    return [
        m for m in model.modules() if isinstance(m, FASAFastRCNNOutputLayers) and m.fasa is not None
    ]


def cluster_classes(means: np.ndarray, seen: np.ndarray, method: str, seed: int) -> np.ndarray:
    """
    Group ids (C,) from the class feature means. Unseen classes get a group of their own each.

    "meanshift": the paper's choice, bandwidth estimated from the data with a fixed seed.
    "affinity": the reference's AffinityPropagation, given similarities (negative squared
    distances) as it expects, not distances. "none": class-wise adaptation.
    """
    C = means.shape[0]
    if method not in CLUSTERING:
        raise ConfigError(
            f"MODEL.FASA.ADAPT.CLUSTERING {method!r} is unknown; use one of {list(CLUSTERING)}."
        )
    groups = np.arange(C)
    idx = np.flatnonzero(seen)
    if method == "none" or len(idx) < 2:
        return groups
    x = means[idx].astype(np.float64)
    if method == "meanshift":
        from sklearn.cluster import MeanShift, estimate_bandwidth

        bandwidth = estimate_bandwidth(x, quantile=0.3, random_state=seed)
        if not bandwidth > 0:
            return groups
        labels = MeanShift(bandwidth=bandwidth).fit_predict(x)
    else:
        from sklearn.cluster import AffinityPropagation

        sim = -((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        labels = AffinityPropagation(affinity="precomputed", random_state=seed).fit_predict(sim)
        if (labels < 0).any():  # did not converge: fall back to class-wise
            return groups
    groups = np.full(C, -1, dtype=np.int64)
    groups[idx] = labels
    unseen = np.flatnonzero(groups < 0)
    groups[unseen] = labels.max() + 1 + np.arange(len(unseen))
    return groups


class _FrozenStatistics:
    """Inside: FASA banks and Seesaw counts refuse updates, BatchNorm uses running stats, and the
    torch RNG state is restored afterwards, so the pass leaves training exactly as it was."""

    def __init__(self, model, predictors):
        self.model, self.predictors = model, predictors

    def __enter__(self):
        self.rng = torch.get_rng_state()
        self.norms = [
            m
            for m in self.model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.training
        ]
        for m in self.norms:
            m.eval()
        for p in self.predictors:
            p.fasa_bank.frozen = True
            n = p.num_classes + 1
            p.val_collect = (
                torch.zeros(n, dtype=torch.float64, device=p.fasa_probs.device),
                torch.zeros(n, dtype=torch.float64, device=p.fasa_probs.device),
            )
        return self

    def __exit__(self, *exc):
        for m in self.norms:
            m.train()
        for p in self.predictors:
            p.fasa_bank.frozen = False
            p.val_collect = None
        torch.set_rng_state(self.rng)


class FASAAdaptationHook(HookBase):
    def __init__(
        self,
        cfg,
        heldout_dataset: str,
        period: int,
        *,
        clustering: str = "meanshift",
        up: float = 1.1,
        down: float = 0.9,
        seed: int = 0,
        metric_fn: Optional[Callable] = None,
    ):
        """
        Args:
            metric_fn: with it, the signal is a metric instead of the loss: ``metric_fn(model)``
                returns per-class scores (higher is better, NaN where undefined) on the held-out
                set, identical on every process; a group whose mean score rose gets p *= up.
                train_net.py builds it from the project's LVIS evaluation (per-category AP).
        """
        if clustering not in CLUSTERING:
            cluster_classes(np.zeros((1, 1)), np.zeros(1, bool), clustering, seed)  # raises
        self.cfg = cfg.clone() if cfg is not None else None
        self.dataset = heldout_dataset
        self.period = period
        self.clustering, self.up, self.down, self.seed = clustering, up, down, seed
        self.metric_fn = metric_fn
        self.passes = 0
        # Per predictor: the previous pass's per-class loss sums and counts.
        self.prev: Optional[List[np.ndarray]] = None
        self.groups: Optional[List[np.ndarray]] = None
        self._loader = None

    def _build_loader(self):
        cfg = self.cfg
        # Ground truth kept (is_train=True), but test-size resizing and no flip.
        mapper = DatasetMapper(
            cfg,
            is_train=True,
            augmentations=[
                T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")
            ],
        )
        return build_detection_test_loader(DatasetCatalog.get(self.dataset), mapper=mapper)

    def after_step(self):
        it = self.trainer.iter + 1
        if self.period > 0 and it % self.period == 0 and it < self.trainer.max_iter:
            self.adapt()

    @torch.no_grad()
    def validation_losses(self, model):
        """Per predictor, (loss sums, counts) per class over the held-out set, all processes."""
        predictors = fasa_predictors(model)
        if self._loader is None:
            self._loader = self._build_loader()
        # A throwaway EventStorage: scalars the model logs on held-out data stay out of the
        # training metrics.
        with _FrozenStatistics(model, predictors), EventStorage():
            for inputs in self._loader:
                model(inputs)
            out = []
            for p in predictors:
                sums, counts = (t[: p.num_classes].clone() for t in p.val_collect)
                if comm.get_world_size() > 1:
                    dist.all_reduce(sums)
                    dist.all_reduce(counts)
                out.append((sums.cpu().numpy(), counts.cpu().numpy()))
        return predictors, out

    def metric_signal(self, model):
        """The metric as (sums, counts) of a loss: -score per class, count 1 where defined."""
        predictors = fasa_predictors(model)
        rng = torch.get_rng_state()
        try:
            score = np.asarray(self.metric_fn(model), dtype=np.float64)
        finally:
            torch.set_rng_state(rng)
        defined = np.isfinite(score)
        stat = (np.where(defined, -score, 0.0), defined.astype(np.float64))
        return predictors, [stat for _ in predictors]

    def adapt(self):
        model = self.trainer.model
        if self.metric_fn is not None:
            predictors, stats = self.metric_signal(model)
        else:
            predictors, stats = self.validation_losses(model)
        groups = []
        for p in predictors:
            g = None
            if comm.is_main_process():
                g = cluster_classes(
                    p.fasa_bank.mean.cpu().numpy(),
                    p.fasa_bank.seen.cpu().numpy(),
                    self.clustering,
                    self.seed,
                )
            groups.append(_broadcast(g))
        storage = self.trainer.storage
        for k, (p, (sums, counts), g) in enumerate(zip(predictors, stats, groups)):
            cur = _group_mean(sums, counts, g)
            prev = None if self.prev is None else _group_mean(*self.prev[k], g)
            new = adapt_probabilities(p.fasa_probs.cpu().numpy(), g, cur, prev, self.up, self.down)
            p.fasa_probs.copy_(torch.as_tensor(new, dtype=p.fasa_probs.dtype))
            prefix = f"fasa/stage{k}/" if len(predictors) > 1 else "fasa/"
            self._log(storage, prefix, new, g, cur, sums, counts)
        self.prev = [(s, c) for s, c in stats]
        self.groups = groups
        self.passes += 1

    def _log(self, storage, prefix, probs, groups, group_loss, sums, counts):
        storage.put_scalar(
            prefix + "num_groups", float(len(np.unique(groups))), smoothing_hint=False
        )
        name = "val_loss" if self.metric_fn is None else "val_neg_ap"
        storage.put_scalar(
            prefix + name, float(sums.sum() / max(counts.sum(), 1)), smoothing_hint=False
        )
        for g in np.unique(groups)[:32]:
            storage.put_scalar(
                prefix + f"p_group{g}", float(probs[groups == g].mean()), smoothing_hint=False
            )
            if np.isfinite(group_loss[g]):
                storage.put_scalar(
                    prefix + f"{name}_group{g}", float(group_loss[g]), smoothing_hint=False
                )

    # Checkpoints are read with torch.load(weights_only=True): tensors and plain Python only.
    def state_dict(self):
        as_t = torch.from_numpy
        return {
            "passes": self.passes,
            "prev": None if self.prev is None else [(as_t(s), as_t(c)) for s, c in self.prev],
            "groups": None if self.groups is None else [as_t(g) for g in self.groups],
        }

    def load_state_dict(self, state):
        self.passes = state["passes"]
        prev, groups = state["prev"], state["groups"]
        self.prev = None if prev is None else [(s.numpy(), c.numpy()) for s, c in prev]
        self.groups = None if groups is None else [g.numpy() for g in groups]


def _group_mean(sums, counts, groups):
    G = int(groups.max()) + 1
    s = np.bincount(groups, weights=sums, minlength=G)
    n = np.bincount(groups, weights=counts, minlength=G)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, s / np.maximum(n, 1e-12), np.nan)


def _broadcast(obj):
    if comm.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def configure_fasa_heldout(cfg):
    """
    Resolve MODEL.FASA.ADAPT.HELDOUT_DATASET in a (defrosted) cfg: carve it from the single
    training dataset unless one is named, and warn when it is an evaluation dataset.
    """
    from ..data.heldout import register_heldout_split

    a = cfg.MODEL.FASA.ADAPT
    if not (cfg.MODEL.FASA.ENABLED and a.ENABLED):
        return cfg
    if not a.HELDOUT_DATASET:
        if len(cfg.DATASETS.TRAIN) != 1:
            raise ConfigError(
                "FASA can carve its held-out split from one training dataset only; "
                f"DATASETS.TRAIN has {len(cfg.DATASETS.TRAIN)}. Name a registered dataset in "
                "MODEL.FASA.ADAPT.HELDOUT_DATASET instead."
            )
        fit, held = register_heldout_split(cfg.DATASETS.TRAIN[0], a.HELDOUT_FRACTION, a.SEED)
        cfg.DATASETS.TRAIN = (fit,)
        a.HELDOUT_DATASET = held
    elif a.HELDOUT_DATASET not in DatasetCatalog.list():
        raise ConfigError(
            f"MODEL.FASA.ADAPT.HELDOUT_DATASET '{a.HELDOUT_DATASET}' is not a registered dataset."
        )
    elif a.HELDOUT_DATASET in cfg.DATASETS.TEST:
        logger.warning(
            "FASA adapts its sampling on '%s', which is also in DATASETS.TEST: the reported "
            "metrics are then tuned on the evaluation data (the reference's leak). Leave "
            "MODEL.FASA.ADAPT.HELDOUT_DATASET empty to carve a held-out part of training instead.",
            a.HELDOUT_DATASET,
        )
    return cfg
