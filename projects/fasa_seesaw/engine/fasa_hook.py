# Copyright (c) fasa_seesaw contributors.
"""
FASA's sampling adaptation as a detectron2 hook: every ``period`` iterations, a validation-loss
pass on held-out data, per-class classification losses reduced over processes, classes grouped
by clustering their feature means, and each group's draw probability moved up if its loss fell
and down if it rose.
"""

import contextlib
import json
import logging
import numpy as np
import os
import random
from typing import Callable, List, Optional, Tuple
import torch
import torch.distributed as dist

from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.data import transforms as T
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

from ..data.resize import build_mapper
from ..errors import ConfigError, check_choice
from ..modeling.fasa import FASA
from ..modeling.fasa_sampling import GROUP_SIGNALS, adapt_probabilities
from ..modeling.fasa_sampling import group_signal as fasa_group_signal
from .rng import preserved_rng_states

__all__ = ["FASAAdaptationHook", "cluster_classes", "fasa_modules", "meanshift_bandwidth"]

logger = logging.getLogger(__name__)

CLUSTERING = ("meanshift", "affinity", "affinity_reference", "none")
# The official code's AffinityPropagation random_state.
REFERENCE_AFFINITY_SEED = 1


def fasa_modules(model) -> List[FASA]:
    """The :class:`FASA` modules of ``model`` (one per box predictor with FASA), in order."""
    model = model.module if hasattr(model, "module") else model
    return [m for m in model.modules() if isinstance(m, FASA)]


def check_adapt_settings(clustering: str, group_signal: str) -> None:
    check_choice("MODEL.FASA.ADAPT.CLUSTERING", clustering, CLUSTERING)
    check_choice("MODEL.FASA.ADAPT.GROUP_SIGNAL", group_signal, GROUP_SIGNALS)


def meanshift_bandwidth(x: np.ndarray, bandwidth: float = 0.0, quantile: float = 0.05) -> float:
    """
    MeanShift's bandwidth: ``bandwidth`` when it is positive, else the ``quantile`` of the
    pairwise Euclidean distances between the rows of ``x`` (the seen classes' means).
    """
    if bandwidth > 0:
        return float(bandwidth)
    iu = np.triu_indices(len(x), k=1)
    return float(np.quantile(np.sqrt(_squared_distances(x)[iu]), quantile))


def _squared_distances(x: np.ndarray) -> np.ndarray:
    """(N, N) squared Euclidean distances from the Gram matrix: O(N^2) memory, not O(N^2 D)."""
    sq = (x * x).sum(1)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)


def cluster_classes(
    means: np.ndarray,
    seen: np.ndarray,
    method: str,
    seed: int,
    *,
    bandwidth: float = 0.0,
    bandwidth_quantile: float = 0.05,
    affinity_damping: float = 0.5,
) -> np.ndarray:
    """
    Group ids (C,) from the class feature means.

    "meanshift" (the paper's choice): MeanShift on the seen classes' means with the bandwidth of
    :func:`meanshift_bandwidth`. "affinity": AffinityPropagation on the seen classes' means,
    given similarities (negative squared distances) as it expects; if it does not converge,
    class-wise groups and a warning. "affinity_reference": the official code's call, unchanged:
    AffinityPropagation given the squared distances of all C means (unseen ones are zero) as if
    they were similarities. "none": class-wise adaptation. Except in "affinity_reference",
    unseen classes get a group of their own each.
    """
    C = means.shape[0]
    check_choice("MODEL.FASA.ADAPT.CLUSTERING", method, CLUSTERING)
    groups = np.arange(C)
    if method == "affinity_reference":
        # As fasa_bbox_head.dynamic_sampling: float32 squared distances of all C means,
        # random_state 1, damping 0.5.
        m = torch.as_tensor(means, dtype=torch.float32)
        x2 = m.square().sum(1)
        distance = (x2[:, None] - 2 * (m @ m.T) + x2[None, :]).numpy()
        labels, converged = _affinity(distance, REFERENCE_AFFINITY_SEED, 0.5)
        if (labels < 0).all():
            logger.warning(
                "FASA: AffinityPropagation (CLUSTERING affinity_reference) found no cluster; "
                "as in the official code, no probability moves this pass."
            )
            return np.full(C, -1, dtype=np.int64)
        if not converged:
            logger.warning(
                "FASA: AffinityPropagation on distances (CLUSTERING affinity_reference) did not "
                "converge; its groups are used as returned, as the official code does."
            )
        return _number_groups(labels)
    idx = np.flatnonzero(seen)
    if method == "none" or len(idx) < 2:
        return groups
    x = means[idx].astype(np.float64)
    if method == "meanshift":
        from sklearn.cluster import MeanShift

        bw = meanshift_bandwidth(x, bandwidth, bandwidth_quantile)
        if not bw > 0:
            logger.warning("FASA: all seen class means coincide; class-wise groups this pass.")
            return groups
        labels = MeanShift(bandwidth=bw).fit_predict(x)
    else:
        sim = -_squared_distances(x)
        labels, converged = _affinity(sim, seed, affinity_damping)
        if not converged:
            logger.warning(
                "FASA: AffinityPropagation did not converge (damping %.2f); class-wise groups "
                "this pass. Raise MODEL.FASA.ADAPT.AFFINITY_DAMPING (e.g. 0.9), or set "
                "MODEL.FASA.ADAPT.CLUSTERING meanshift.",
                affinity_damping,
            )
            return groups
    groups = np.full(C, -1, dtype=np.int64)
    groups[idx] = _number_groups(labels)
    unseen = np.flatnonzero(groups < 0)
    groups[unseen] = groups.max() + 1 + np.arange(len(unseen))
    return groups


def _affinity(matrix, seed, damping):
    """AffinityPropagation labels on a precomputed matrix, and whether it converged."""
    import warnings
    from sklearn.cluster import AffinityPropagation
    from sklearn.exceptions import ConvergenceWarning

    ap = AffinityPropagation(affinity="precomputed", damping=damping, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        labels = ap.fit_predict(matrix)
    not_converged = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    for w in caught:  # other warnings are passed on, not swallowed
        if w not in not_converged:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return labels, not not_converged and (labels >= 0).all()


def _number_groups(labels):
    """Consecutive group ids 0..G-1; a negative label (no cluster) becomes a group of its own."""
    labels = np.asarray(labels).copy()
    neg = np.flatnonzero(labels < 0)
    labels[neg] = labels.max(initial=-1) + 1 + np.arange(len(neg))
    return np.unique(labels, return_inverse=True)[1].reshape(-1).astype(np.int64)


class _FrozenStatistics:
    """Inside: every FASA module collects its validation losses (its predictor's losses update no
    bank, class count or weight), BatchNorm uses running stats, and every random-number
    generator (python, numpy, torch CPU and each accelerator's) is restored afterwards, so the
    pass leaves training exactly as it was."""

    def __init__(self, model, fasas):
        self.model, self.fasas = model, fasas

    def __enter__(self):
        with contextlib.ExitStack() as stack:  # undone at once if entering fails part-way
            stack.enter_context(preserved_rng_states())
            self.norms = [
                m
                for m in self.model.modules()
                if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.training
            ]
            stack.callback(lambda: [m.train() for m in self.norms])
            for m in self.norms:
                m.eval()
            self.collected = [stack.enter_context(p.collect_val_losses()) for p in self.fasas]
            self.stack = stack.pop_all()
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


class FASAAdaptationHook(HookBase):
    def __init__(
        self,
        cfg,
        heldout_dataset: str,
        period: int,
        *,
        clustering: str = "meanshift",
        group_signal: str = "reference",
        bandwidth: float = 0.0,
        bandwidth_quantile: float = 0.05,
        affinity_damping: float = 0.5,
        augment: bool = False,
        up: float = 1.1,
        down: float = 0.9,
        seed: int = 0,
        metric_fn: Optional[Callable] = None,
    ):
        """
        Args:
            group_signal: how a group's loss is formed from the per-class sums
                (:func:`fasa_seesaw.modeling.fasa_sampling.group_signal`).
            bandwidth, bandwidth_quantile, affinity_damping: clustering settings
                (:func:`cluster_classes`).
            augment: give the held-out images the training augmentations (the reference's
                choice) instead of the deterministic test-size resize.
            metric_fn: with it, the signal is a metric instead of the loss: ``metric_fn(model)``
                returns per-class scores (higher is better, NaN where undefined) on the held-out
                set, identical on every process; a group whose mean score rose gets p *= up.
                train_net.py builds it from the project's LVIS evaluation (per-category AP).
        """
        check_adapt_settings(clustering, group_signal)
        self.cfg = cfg.clone() if cfg is not None else None
        self.dataset = heldout_dataset
        self.period = period
        self.clustering, self.up, self.down, self.seed = clustering, up, down, seed
        self.group_signal = group_signal
        self.augment = augment
        self.cluster_kwargs = dict(
            bandwidth=bandwidth,
            bandwidth_quantile=bandwidth_quantile,
            affinity_damping=affinity_damping,
        )
        self.metric_fn = metric_fn
        self.passes = 0
        # Per predictor: the previous pass's per-class loss sums and RoI counts (C + 1 each,
        # background last), kept per class and regrouped with the current groups.
        self.prev: Optional[List[Tuple[np.ndarray, np.ndarray]]] = None
        self.groups: Optional[List[np.ndarray]] = None
        self._loader = None

    @classmethod
    def from_config(cls, cfg, heldout_dataset, period, metric_fn=None):
        a = cfg.MODEL.FASA.ADAPT
        return cls(
            cfg,
            heldout_dataset,
            period,
            clustering=a.CLUSTERING,
            group_signal=a.GROUP_SIGNAL,
            bandwidth=a.BANDWIDTH,
            bandwidth_quantile=a.BANDWIDTH_QUANTILE,
            affinity_damping=a.AFFINITY_DAMPING,
            augment=a.AUGMENT,
            up=a.UP_FACTOR,
            down=a.DOWN_FACTOR,
            seed=a.SEED,
            metric_fn=metric_fn,
        )

    def _build_loader(self):
        cfg = self.cfg
        if self.augment:  # the training augmentations (random scale and flip), as the reference
            mapper = build_mapper(cfg, is_train=True)
        else:  # ground truth kept (is_train=True), but test-size resizing and no flip
            mapper = build_mapper(
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
        """
        Per predictor, (loss sums, RoI counts) per class over the held-out set, all processes:
        float64 arrays of length C + 1, background RoIs counted in the last slot.
        """
        fasas = fasa_modules(model)
        if self._loader is None:
            self._loader = self._build_loader()
        # A throwaway EventStorage: scalars the model logs on held-out data stay out of the
        # training metrics.
        with _FrozenStatistics(model, fasas) as frozen, EventStorage():
            if self.augment:
                # The mapper draws from the global generators, restored after every pass: seed
                # them per pass so that passes differ and a resumed run repeats them.
                pass_seed = (self.seed * 1_000_003 + self.passes) % 2**32
                np.random.seed(pass_seed)
                random.seed(pass_seed)
            for inputs in self._loader:
                model(inputs)
            out = []
            for sums, counts in frozen.collected:
                sums, counts = sums.clone(), counts.clone()
                if comm.get_world_size() > 1:
                    dist.all_reduce(sums)
                    dist.all_reduce(counts)
                out.append((sums.cpu().numpy(), counts.cpu().numpy()))
        return fasas, out

    def metric_signal(self, model):
        """The metric as (sums, counts) of a loss: -score per class, count 1 where defined."""
        fasas = fasa_modules(model)
        with preserved_rng_states():
            score = np.asarray(self.metric_fn(model), dtype=np.float64)
        defined = np.isfinite(score)
        stat = (
            np.append(np.where(defined, -score, 0.0), 0.0),
            np.append(defined.astype(np.float64), 0.0),
        )
        return fasas, [stat for _ in fasas]

    def _signal_mode(self):
        # A metric is compared by its mean over the group's classes with a defined value.
        return "mean_per_roi" if self.metric_fn is not None else self.group_signal

    def adapt(self):
        model = self.trainer.model
        if self.metric_fn is not None:
            fasas, stats = self.metric_signal(model)
        else:
            fasas, stats = self.validation_losses(model)
        self.apply(fasas, stats, self.trainer.storage)

    def apply(self, fasas, stats, storage=None):
        """
        One adaptation step from one pass's statistics: group the classes of each FASA module
        (one per box predictor: per cascade stage), compare each group's value with the previous
        pass's (regrouped with the current groups) and move its probabilities. ``stats``: per
        module, (loss sums, RoI counts) per class,
        C + 1 entries with the background last (:meth:`validation_losses`). Scalars go to
        ``storage`` when one is given.
        """
        groups = []
        for p in fasas:
            g = None
            if comm.is_main_process():
                g = cluster_classes(
                    p.bank.mean.cpu().numpy(),
                    p.bank.seen.cpu().numpy(),
                    self.clustering,
                    self.seed,
                    **self.cluster_kwargs,
                )
            groups.append(_broadcast(g))
        mode = self._signal_mode()
        for k, (p, (sums, counts), g) in enumerate(zip(fasas, stats, groups)):
            old = p.probs.cpu().numpy().copy()  # .numpy() of a CPU tensor shares its memory
            no_cluster = (g < 0).all()  # affinity_reference found none: nothing moves
            if no_cluster:
                g = np.arange(len(g))
            cur = fasa_group_signal(sums, counts, g, mode)
            if no_cluster or self.prev is None:
                new = old.astype(np.float64)
            else:
                prev = fasa_group_signal(*self.prev[k], g, mode)
                new = adapt_probabilities(old, g, cur, prev, self.up, self.down)
            p.probs.copy_(torch.as_tensor(new, dtype=p.probs.dtype))
            prefix = f"fasa/stage{k}/" if len(fasas) > 1 else "fasa/"
            self._log(storage, prefix, new, g, cur, sums, counts)
            self._record(k, old, new, g)
        self.prev = [(np.asarray(s, np.float64), np.asarray(c, np.float64)) for s, c in stats]
        self.groups = groups
        self.passes += 1

    def _record(self, stage, old, new, groups):
        """Appends the pass to <OUTPUT_DIR>/fasa_adaptation.jsonl (main process): the groups it
        formed and how many classes moved. A resumed run may repeat a pass: the last line of a
        (pass, stage) is the one that counts. Only a hook registered with a trainer writes."""
        out = self.cfg.OUTPUT_DIR if self.cfg is not None else ""
        if not out or self.trainer is None or not comm.is_main_process():
            return
        sizes = np.bincount(groups)
        sizes = sorted((int(x) for x in sizes[sizes > 0]), reverse=True)
        rec = {
            "pass": self.passes + 1,
            "iteration": int(self.trainer.iter + 1) if hasattr(self.trainer, "iter") else None,
            "stage": stage,
            "num_groups": len(sizes),
            "largest_group": sizes[0],
            "group_sizes": sizes,
            "moved_up": int((new > old * (1 + 1e-9)).sum()),
            "moved_down": int((new < old * (1 - 1e-9)).sum()),
            "p_sum": float(np.sum(new)),
        }
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "fasa_adaptation.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    def _log(self, storage, prefix, probs, groups, group_value, sums, counts):
        sizes = np.bincount(groups)
        sizes = sizes[sizes > 0]
        logger.info(
            "FASA adaptation pass %d (%s): %d groups, the largest with %d of %d classes",
            self.passes + 1,
            prefix.rstrip("/"),
            len(sizes),
            sizes.max(),
            len(groups),
        )
        if storage is None:
            return
        storage.put_scalar(prefix + "num_groups", float(len(sizes)), smoothing_hint=False)
        storage.put_scalar(prefix + "largest_group", float(sizes.max()), smoothing_hint=False)
        C = len(groups)
        name = "val_loss" if self.metric_fn is None else "val_neg_ap"
        storage.put_scalar(
            prefix + name,
            float(sums[:C].sum() / max(counts[:C].sum(), 1)),
            smoothing_hint=False,
        )
        for g in np.unique(groups)[:32]:
            storage.put_scalar(
                prefix + f"p_group{g}", float(probs[groups == g].mean()), smoothing_hint=False
            )
            if np.isfinite(group_value[g]):
                storage.put_scalar(
                    prefix + f"{name}_group{g}", float(group_value[g]), smoothing_hint=False
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
        if self.prev is not None and self.groups is not None:
            if any(len(s) == len(g) for (s, _), g in zip(self.prev, self.groups)):
                # Saved before the background count was kept (C entries, not C + 1): the next
                # pass sets a new baseline instead of comparing against an incomparable one.
                logger.warning(
                    "FASA: the checkpoint's previous validation pass has no background count; "
                    "the next pass starts a new baseline."
                )
                self.prev = None


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
    carving = cfg.MODEL.FASA.ENABLED and a.ENABLED
    if not carving and cfg.FASA_SEESAW.HOLD_OUT_FASA_SPLIT:
        if len(cfg.DATASETS.TRAIN) != 1:
            raise ConfigError(
                "FASA_SEESAW.HOLD_OUT_FASA_SPLIT carves one training dataset; DATASETS.TRAIN has "
                f"{len(cfg.DATASETS.TRAIN)}."
            )
        fit, _ = register_heldout_split(cfg.DATASETS.TRAIN[0], a.HELDOUT_FRACTION, a.SEED)
        cfg.DATASETS.TRAIN = (fit,)
        return cfg
    if not carving:
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
