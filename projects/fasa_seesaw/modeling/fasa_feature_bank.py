# Copyright (c) fasa_seesaw contributors.
"""
FASA's per-class feature bank: running mean and diagonal variance of the classifier-input
feature of positive RoIs.

Two modes:
- "ema" (the reference's): on a class's first sighting the batch statistics are copied; after
  that mu <- m * batch_mean + (1 - m) * mu and likewise for the batch variance, m = momentum (0.1).
- "exact": the running mean and variance of every feature seen so far, merged batch by batch with
  Chan et al.'s parallel update, so the result does not depend on how the data was split into
  batches or processes.

The variance is the sample variance by default, as the reference's ``fa_update_push`` takes it:
sum of squared deviations / (n - 1) for n > 1, and 0 for n = 1 (per batch in "ema", over all
features in "exact"). ``variance="population"`` divides by n instead.

Statistics are persistent buffers (they travel with checkpoints) and, with ``sync``, per-class
sums are all-reduced before the update so every process holds the same bank. Everything is
vectorised with ``index_add_``: no per-class Python loop and no host-device sync.
"""

import contextlib
import torch
import torch.distributed as dist
from torch import nn

from ..errors import check_choice, check_range

__all__ = ["ClassFeatureBank"]

_MODES = ("ema", "exact")
VARIANCES = ("sample", "population")


def _world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def check_bank_settings(mode: str, momentum: float, variance: str) -> None:
    """Raise ConfigError naming the MODEL.FASA key of a bad bank setting."""
    check_choice("MODEL.FASA.BANK_MODE", mode, _MODES)
    check_choice("MODEL.FASA.BANK_VARIANCE", variance, VARIANCES)
    check_range("MODEL.FASA.BANK_MOMENTUM", momentum, 0.0, 1.0, low_open=True)


class PausableStatistics(nn.Module):
    """A module of running statistics whose ``update`` does nothing while ``frozen``."""

    frozen = False

    @contextlib.contextmanager
    def paused(self):
        """Inside, :meth:`update` changes nothing (FASA's validation pass uses this)."""
        frozen, self.frozen = self.frozen, True
        try:
            yield self
        finally:
            self.frozen = frozen


class ClassFeatureBank(PausableStatistics):
    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        *,
        mode: str = "ema",
        momentum: float = 0.1,
        sync: bool = True,
        variance: str = "sample",
    ):
        super().__init__()
        check_bank_settings(mode, momentum, variance)
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.mode = mode
        self.momentum = float(momentum)
        self.sync = sync
        self.variance = variance
        self.frozen = False
        self.register_buffer("mean", torch.zeros(num_classes, feature_dim))
        self.register_buffer("var", torch.zeros(num_classes, feature_dim))
        # Number of features seen per class (exact mode weighs merges with it; both modes use
        # count > 0 as "seen").
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))

    @property
    def seen(self) -> torch.Tensor:
        return self.count > 0

    def _ddof(self) -> int:
        return 1 if self.variance == "sample" else 0

    def _var(self, m2, n):
        """Variance from the sum of squared deviations m2 of n features; 0 where n <= ddof."""
        return m2 / (n - self._ddof()).clamp(min=1)

    def _batch_sums(self, features, labels):
        """Per-class n, sum; background (label == num_classes) goes to a dropped slot."""
        C = self.num_classes
        labels = labels.long()
        n = torch.zeros(C + 1, dtype=features.dtype, device=features.device)
        n.index_add_(0, labels, torch.ones_like(labels, dtype=features.dtype))
        s = torch.zeros(C + 1, self.feature_dim, dtype=features.dtype, device=features.device)
        s.index_add_(0, labels, features)
        return n, s

    def _all_reduce(self, *tensors):
        if self.sync and _world_size() > 1:
            for t in tensors:
                dist.all_reduce(t)

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """
        Args:
            features: (N, D) classifier-input features of sampled RoIs (detached here).
            labels: (N,) in [0, C]; C (background) is ignored.
        """
        if self.frozen:
            return
        # float64 arithmetic, float32 storage: the statistics carry no accumulation error.
        x = features.detach().double()
        C = self.num_classes
        n, s = self._batch_sums(x, labels)
        self._all_reduce(n, s)
        batch_mean = s / n.clamp(min=1)[:, None]
        # Second pass around the (global) batch mean: numerically safe variance.
        centred = x - batch_mean[labels.long()]
        m2 = torch.zeros_like(s)
        m2.index_add_(0, labels.long(), centred * centred)
        self._all_reduce(m2)
        n, batch_mean, m2 = n[:C], batch_mean[:C], m2[:C]
        batch_var = self._var(m2, n[:, None])
        present = (n > 0)[:, None]
        first = present & ~self.seen[:, None]

        mean, var = self.mean.double(), self.var.double()
        if self.mode == "ema":
            m = self.momentum
            new_mean = torch.where(first, batch_mean, (1 - m) * mean + m * batch_mean)
            new_var = torch.where(first, batch_var, (1 - m) * var + m * batch_var)
        else:
            na = self.count.to(x.dtype)[:, None]
            nb = n[:, None]
            total = (na + nb).clamp(min=1)
            delta = batch_mean - mean
            new_mean = mean + delta * nb / total
            # var * (na - ddof) recovers the stored features' m2 (0 when na <= ddof: var is 0).
            m2_a = var * (na - self._ddof()).clamp(min=0)
            new_m2 = m2_a + m2 + delta * delta * na * nb / total
            new_var = self._var(new_m2, na + nb)
        self.mean.copy_(torch.where(present, new_mean, mean))
        self.var.copy_(torch.where(present, new_var, var))
        self.count += n.round().long()

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, mode={self.mode}, "
            f"momentum={self.momentum}, variance={self.variance}, sync={self.sync}"
        )
