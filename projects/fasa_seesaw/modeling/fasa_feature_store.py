# Copyright (c) fasa_seesaw contributors.
"""
A per-class store of the last M real classifier-input features of positive RoIs: a ring buffer
per class, for the augmentations in FASA's slot that need real features rather than a mean and a
variance (SMOTE, MoEx: :mod:`.feature_augment`).

The k-th feature ever stored for class c (k = 0, 1, ...) goes to slot k mod M, so slots fill in
order and the valid ones are always ``0 .. min(count, M) - 1``; within a batch, RoIs count in
their order (with more than M RoIs of a class in one batch, the last M stay).

Memory: C x M x D float32, plus C counters. At LVIS scale (1,203 classes, 1,024-d box head) that
is 4.9 MB per stored feature per class: 39 MB at M = 8, 79 MB at M = 16, per predictor (a
Cascade R-CNN has three) and in every checkpoint.

State is persistent buffers (checkpointed). With ``sync``, every process gathers the positive
RoIs of all processes (in rank order) before writing, so all processes hold the same store, as
:class:`.fasa_feature_bank.ClassFeatureBank` all-reduces its sums; this costs one small
all-gather of sizes (a host sync) and one of the positives per step. Without ``sync`` each
process stores its own RoIs.
"""

import torch
import torch.distributed as dist

from .fasa_feature_bank import PausableStatistics, _world_size

__all__ = ["ClassFeatureStore"]


class ClassFeatureStore(PausableStatistics):
    def __init__(self, num_classes: int, feature_dim: int, memory: int, *, sync: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.memory = int(memory)
        self.sync = sync
        self.frozen = False
        self.register_buffer("features", torch.zeros(num_classes, self.memory, feature_dim))
        # Features ever stored per class; slot of the next one: count mod memory.
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))

    @property
    def size(self) -> torch.Tensor:
        """(C,) valid slots per class: min(count, memory)."""
        return self.count.clamp(max=self.memory)

    def _gather(self, x, labels):
        """The positive rows of all processes, in rank order (padding rows are background)."""
        if not (self.sync and _world_size() > 1):
            return x, labels
        keep = labels < self.num_classes
        x, labels = x[keep], labels[keep]
        world = _world_size()
        n = torch.tensor([x.shape[0]], device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n)
        most = max(int(s.item()) for s in sizes)
        pad = most - x.shape[0]
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
        labels = torch.cat([labels, labels.new_full((pad,), self.num_classes)])
        xs = [torch.empty_like(x) for _ in range(world)]
        ls = [torch.empty_like(labels) for _ in range(world)]
        dist.all_gather(xs, x)
        dist.all_gather(ls, labels)
        return torch.cat(xs), torch.cat(ls)

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Store the rows of ``features`` (N, D, detached here) whose ``labels`` (N,) are a class
        (< C); background rows (C) are skipped."""
        if self.frozen:
            return
        x, labels = self._gather(features.detach().to(self.features.dtype), labels.long())
        N = x.shape[0]
        if N == 0:
            return
        C, M, D = self.features.shape
        device = x.device
        # Rank of each row among the rows of its class, in row order (a stable sort by class).
        n = torch.zeros(C + 1, dtype=torch.long, device=device)
        n.index_add_(0, labels, torch.ones_like(labels))
        order = torch.sort(labels, stable=True).indices
        first = n.cumsum(0) - n
        rank = torch.empty_like(labels)
        rank[order] = torch.arange(N, device=device) - first[labels[order]]
        count = torch.cat([self.count, self.count.new_zeros(1)])
        slot = labels * M + (count[labels] + rank) % M  # background: the dropped slots C*M..
        # Rows that land on the same slot: the last one stays (amax of the row index).
        winner = torch.full(((C + 1) * M,), -1, dtype=torch.long, device=device)
        winner.scatter_reduce_(0, slot, torch.arange(N, device=device), "amax")
        winner = winner[: C * M]
        flat = self.features.view(C * M, D)
        flat.copy_(torch.where((winner >= 0)[:, None], x[winner.clamp(min=0)], flat))
        self.count += n[:C]

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, "
            f"memory={self.memory}, sync={self.sync}"
        )
