# Copyright (c) fasa_seesaw contributors.
"""
FASA's sampling pieces as plain functions: initial class probabilities, virtual-feature
generation, and the loss-driven adaptation rule. Nothing here knows about detectron2.
"""

import numpy as np
from typing import Optional, Sequence
import torch

from ..errors import ConfigError, check_choice
from .feature_augment import draw_classes

__all__ = [
    "initial_probabilities",
    "sample_virtual_features",
    "group_signal",
    "adapt_probabilities",
]

GROUP_SIGNALS = ("reference", "mean_per_roi")
INIT_PROBS = ("inverse_frequency", "uniform")


def initial_probabilities(instance_counts: Sequence[float], mode: str = "inverse_frequency"):
    """
    Initial per-class draw probabilities p_c.

    "inverse_frequency" (the reference default, power 1, scale 1): p_c = (1/n_c) / sum_k (1/n_k),
    counts clamped to >= 1, then clamped to [0, 1]. "uniform": p_c = 1/C.
    """
    counts = np.maximum(np.asarray(instance_counts, dtype=np.float64), 1.0)
    if counts.ndim != 1 or counts.size == 0:
        raise ConfigError("FASA needs one instance count per class (a non-empty 1-d list).")
    check_choice("MODEL.FASA.INIT_PROBS", mode, INIT_PROBS)
    if mode == "inverse_frequency":
        inv = 1.0 / counts
        p = inv / inv.sum()
    else:
        p = np.full(counts.shape, 1.0 / counts.size)
    return np.clip(p, 0.0, 1.0)


def sample_virtual_features(
    mean: torch.Tensor,
    var: torch.Tensor,
    seen: torch.Tensor,
    probs: torch.Tensor,
    samples_per_class: int = 1,
    clamp_min: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    compact: Optional[bool] = None,
):
    """
    Draw virtual features for every class at once (no per-class Python loop).

    Each class c is drawn with probability p_c (Bernoulli, and only if it has been seen); a drawn
    class yields ``samples_per_class`` features mu_c + sigma_c * N(0, I).

    Two layouts, the same distribution:

    - fixed (``compact=False``, the default on accelerators): C * samples_per_class rows whatever
      was drawn, with a 0/1 ``weight`` saying which rows count; no host-device sync, so the
      training step never waits on the accelerator.
    - compact (``compact=True``, the default on CPU, where there is nothing to wait for): only
      the rows of drawn classes, all with weight 1, so the classifier runs on a handful of rows
      instead of C * samples_per_class.

    Returns:
        features (N, D), labels (N,), weight (N,) float.
    """
    D = mean.shape[1]
    k = samples_per_class
    idx, weight = draw_classes(probs, seen, mean.dtype, generator, compact)
    n = idx.numel()
    noise = torch.randn(n, k, D, device=mean.device, generator=generator, dtype=mean.dtype)
    feats = mean[idx][:, None, :] + var[idx].clamp(min=0).sqrt()[:, None, :] * noise
    labels = idx.repeat_interleave(k)
    weight = weight.repeat_interleave(k)
    if clamp_min is not None:
        feats = feats.clamp(min=clamp_min)
    return feats.reshape(n * k, D), labels, weight


def group_signal(sums, counts, groups, mode: str = "reference") -> np.ndarray:
    """
    One validation value per group from the per-class sums of a validation pass.

    Args:
        sums: (C + 1,) or (C,) per-class sums of the per-RoI classification loss (slot C, the
            background, is never part of a group).
        counts: same length: sampled RoIs per class; with C + 1 entries slot C counts the
            background RoIs.
        groups: (C,) group id per class.
        mode: "reference" (the official code's ``dynamic_sampling``): each class's loss sum
            divided by the total number of RoIs of the pass, background included, summed over
            the group's classes; a group without RoIs has value 0. "mean_per_roi": the group's
            loss sum divided by its number of foreground RoIs (NaN without any), which does not
            move when only the foreground share of the sampled RoIs changes.

    Returns:
        (G,) float64, G = groups.max() + 1.
    """
    check_choice("MODEL.FASA.ADAPT.GROUP_SIGNAL", mode, GROUP_SIGNALS)
    groups = np.asarray(groups)
    C = len(groups)
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    G = int(groups.max()) + 1 if C else 0
    s = np.bincount(groups, weights=sums[:C], minlength=G)
    if mode == "reference":
        total = counts.sum()
        if not total > 0:
            return np.full(G, np.nan)
        return s / total
    n = np.bincount(groups, weights=counts[:C], minlength=G)  # "mean_per_roi"
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, s / np.maximum(n, 1e-12), np.nan)


def adapt_probabilities(
    probs: np.ndarray,
    groups: np.ndarray,
    group_loss: np.ndarray,
    prev_group_loss: Optional[np.ndarray],
    up: float = 1.1,
    down: float = 0.9,
) -> np.ndarray:
    """
    FASA's adaptation rule: for each group g, if its validation loss fell since the last pass,
    p *= up for all its classes; if it rose, p *= down; if it is equal, p stays; then clamp to
    [0, 1]. With no previous pass (or a NaN value: a group without samples under
    "mean_per_roi") the probabilities stay.

    Args:
        probs: (C,) current probabilities.
        groups: (C,) group id per class (class-wise mode: groups = arange(C)).
        group_loss, prev_group_loss: (G,) validation value per group of this pass and of the
            previous one, both computed with the current groups (:func:`group_signal`).
    """
    probs = np.asarray(probs, dtype=np.float64).copy()
    if prev_group_loss is None:
        return probs
    cur = np.asarray(group_loss, dtype=np.float64)
    prev = np.asarray(prev_group_loss, dtype=np.float64)
    factor = np.ones_like(cur)
    valid = np.isfinite(cur) & np.isfinite(prev)
    factor[valid & (cur < prev)] = up
    factor[valid & (cur > prev)] = down
    return np.clip(probs * factor[np.asarray(groups)], 0.0, 1.0)
