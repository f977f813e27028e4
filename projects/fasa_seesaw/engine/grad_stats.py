# Copyright (c) fasa_seesaw contributors.
"""
Cumulative classification gradients of positive and negative samples per category, collected
during training (Seesaw supplement, section 2 and Figure A1), behind FASA_SEESAW.GRAD_STATS.

For category c, with z_rc the class-c logit of RoI r and y_r its label (C meaning background):

    pos_c = sum over RoIs with y_r == c of |dL/dz_rc|
    neg_c = sum over RoIs with y_r != c (other classes and background) of |dL/dz_rc|

summed over all training steps and processes; the figure plots pos_c / neg_c. L is the total
training loss, so loss weights and normalisation are included, and only the real RoIs of the
batch count (FASA's virtual features have logits of their own and are left out).

Only the C class logits are read, which are columns [0, C) in every score layout of this
project: detectron2's softmax scores (C+1, background last), its sigmoid scores (C+1, the last
column unused) and Seesaw's (C+2: C class logits trained by the Seesaw CE on foreground RoIs,
then the [foreground, background] objectness pair). With Seesaw, background RoIs put no gradient
on class logits (the objectness pair handles them), so its negatives come from other classes'
RoIs only; that is how the loss is defined, and what the figure shows.
"""

import functools
import logging
import numpy as np
import os
from typing import Callable, Dict, List, Optional
import torch
import torch.distributed as dist
from torch import nn

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..errors import ConfigError
from ..evaluation.category_table import (
    category_table,
    grad_ratio,
    index_table,
    write_grad_stats_csv,
)
from ..modeling.cls_losses import resolve_cls_loss
from ..modeling.fast_rcnn import box_predictors

__all__ = ["GradientStatsHook", "accumulate_class_gradients", "build_grad_stats_hook"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def accumulate_class_gradients(
    grad: torch.Tensor, labels: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
) -> None:
    """
    Add one batch's positive and negative gradient magnitudes to ``pos`` and ``neg`` in place.

    Args:
        grad: (R, C) gradient of the loss on the C class logits.
        labels: (R,) labels in [0, C], C meaning background.
        pos, neg: (C,) accumulators (float64).

    No host sync and no loop over classes: the labelled column of each row is gathered (rows of
    background read a dummy column and are masked) and scattered with ``index_add_`` into C+1
    slots, the last one for background and dropped; negatives are the column sums minus that.
    """
    C = pos.shape[0]
    g = grad.detach().abs()
    is_fg = labels < C
    col = torch.where(is_fg, labels, torch.zeros_like(labels))
    own = g.gather(1, col[:, None].long())[:, 0].to(pos.dtype) * is_fg.to(pos.dtype)
    slot = torch.zeros(C + 1, dtype=pos.dtype, device=pos.device)
    slot.index_add_(0, labels.long(), own)
    total = g.sum(dim=0, dtype=pos.dtype)
    pos += slot[:C]
    neg += total - slot[:C]


class GradientStatsHook(HookBase):
    """
    Accumulates per-class positive and negative gradients on the class logits of every box
    predictor (every cascade stage), and at the end of training writes ``grad_stats.csv`` and
    ``grad_ratio.png`` to ``output_dir`` (the sum over stages; with several stages also
    ``grad_stats_stage{k}.csv``).

    A scores hook on each predictor (``register_scores_hook``) puts, in a training forward, a
    tensor hook on its class scores that receives dL/dscores in the backward pass. The hook
    returns None, so losses and gradients are unchanged; it reads nothing to the host. Nothing
    is collected under no_grad or during FASA's validation pass (the predictor calls no scores
    hook there). With AMP, gradients are
    divided by the GradScaler's current scale, and a step whose scaled gradients overflowed
    (which the scaler skips) adds nothing.

    Every process accumulates its own RoIs. Totals are summed over processes at the iterations
    where the checkpointer saves (``sync_period``, and the last one) and at the end; the
    checkpoint holds the summed totals (identical on every process), so a resumed run neither
    loses nor double-counts. Stateful: put it before the checkpointer.
    """

    def __init__(
        self,
        output_dir: Optional[str] = None,
        *,
        category_info: Optional[Callable[[], Dict[str, list]]] = None,
        label: str = "model",
        sync_period: int = 0,
    ):
        """
        Args:
            output_dir: where the CSV and PNG go at the end of training; None writes nothing.
            category_info: returns the table of
                :func:`~fasa_seesaw.evaluation.category_table.category_table`; None names classes by
                index.
            label: the line's name in grad_ratio.png, e.g. "Seesaw" or "CE".
            sync_period: the checkpoint period (SOLVER.CHECKPOINT_PERIOD); 0 syncs at the end
                only.
        """
        self.output_dir = output_dir
        self.category_info = category_info
        self.label = label
        self.sync_period = sync_period
        self._predictors: List[nn.Module] = []
        self._scaler = None
        # (2, S, C) float64: [pos, neg] per stage, this process since the last sync ...
        self._local: Optional[torch.Tensor] = None
        # ... and summed over processes up to the last sync (the checkpointed state).
        self._synced: Optional[torch.Tensor] = None
        self._loaded: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ collection
    def before_train(self):
        self.attach(self.trainer.model)
        inner = getattr(self.trainer, "_trainer", self.trainer)
        scaler = getattr(inner, "grad_scaler", None)
        self._scaler = scaler if scaler is not None and scaler.is_enabled() else None

    def attach(self, model) -> None:
        """Wrap the box predictors of ``model`` and allocate (or restore) the accumulators."""
        self.detach()
        self._predictors = box_predictors(model, required_by="FASA_SEESAW.GRAD_STATS.ENABLED")
        num_classes = {p.num_classes for p in self._predictors}
        if len(num_classes) != 1:
            raise ConfigError(f"box predictors disagree on the number of classes: {num_classes}")
        C, S = num_classes.pop(), len(self._predictors)
        device = next(self._predictors[0].parameters()).device
        self._local = torch.zeros(2, S, C, dtype=torch.float64, device=device)
        self._synced = torch.zeros_like(self._local)
        if self._loaded is not None:
            if tuple(self._loaded.shape) == (2, S, C):
                self._synced.copy_(self._loaded)
            else:
                logger.warning(
                    "Gradient statistics in the checkpoint have shape %s, the model needs %s; "
                    "starting from zero",
                    tuple(self._loaded.shape),
                    (2, S, C),
                )
            self._loaded = None
        self._handles = [
            p.register_scores_hook(functools.partial(self._on_scores, k, p))
            for k, p in enumerate(self._predictors)
        ]

    def detach(self) -> None:
        """Remove the scores hooks from the predictors."""
        for handle in getattr(self, "_handles", []):
            handle.remove()
        self._handles = []

    def _on_scores(self, k: int, predictor: nn.Module, scores, labels) -> None:
        if predictor.training and torch.is_grad_enabled() and scores.requires_grad:
            scores.register_hook(functools.partial(self._on_grad, k, labels))

    def _on_grad(self, k: int, labels: torch.Tensor, grad: torch.Tensor) -> None:
        C = self._local.shape[2]
        g = grad[:, :C].detach()
        scale = None if self._scaler is None else getattr(self._scaler, "_scale", None)
        if scale is not None:
            g = g.float() / scale.to(g.device, torch.float32)
            g = torch.where(torch.isfinite(g).all(), g, torch.zeros_like(g))
        accumulate_class_gradients(g, labels.to(g.device), self._local[0, k], self._local[1, k])
        return None  # the gradient passes on unchanged

    # ------------------------------------------------------------------ reduction
    def after_step(self):
        if self._local is None or comm.get_world_size() == 1:
            return
        it = self.trainer.iter + 1
        if it == self.trainer.max_iter or (self.sync_period > 0 and it % self.sync_period == 0):
            self._fold()

    def _fold(self) -> None:
        """Add every process's local sums to the synced totals (collective if distributed)."""
        local = self._local.clone()
        if comm.get_world_size() > 1:
            dist.all_reduce(local)
        self._synced += local
        self._local.zero_()

    def totals(self) -> np.ndarray:
        """(2, S, C) [pos, neg] per stage over all processes so far. Collective if distributed."""
        self._fold()
        return self._synced.cpu().numpy()

    # ------------------------------------------------------------------ output
    def after_train(self):
        try:
            if self._local is None:
                return
            finished = self.trainer.iter >= self.trainer.max_iter
            if comm.get_world_size() > 1 and not finished:
                # Another process may have died: a collective could hang.
                logger.warning("Training did not finish; gradient statistics are not written")
                return
            stats = self.totals()
            if comm.is_main_process() and self.output_dir:
                self.write(stats, self.output_dir)
        finally:
            self.detach()

    def write(self, stats: np.ndarray, output_dir: str) -> List[str]:
        """Write the CSV(s) and grad_ratio.png for (2, S, C) totals; returns the paths."""
        from ..evaluation.figures import plot_grad_ratio  # matplotlib only when writing

        S, C = stats.shape[1:]
        table = self.category_info() if self.category_info is not None else index_table(C)
        os.makedirs(output_dir, exist_ok=True)
        pos, neg = stats[0].sum(axis=0), stats[1].sum(axis=0)
        paths = [write_grad_stats_csv(os.path.join(output_dir, "grad_stats.csv"), table, pos, neg)]
        series = {self.label: grad_ratio(pos, neg)}
        if S > 1:
            series = {f"{self.label}, all stages": series[self.label]}
            for k in range(S):
                path = os.path.join(output_dir, f"grad_stats_stage{k}.csv")
                paths.append(write_grad_stats_csv(path, table, stats[0, k], stats[1, k]))
                series[f"{self.label}, stage {k}"] = grad_ratio(stats[0, k], stats[1, k])
        png = os.path.join(output_dir, "grad_ratio.png")
        paths.append(
            plot_grad_ratio(
                series,
                table["train_images"],
                table["frequency"],
                png,
                title="Cumulative positive / negative classification gradient per category",
                names=table["name"],
            )
        )
        ratio = grad_ratio(pos, neg)
        freq = np.asarray(table["frequency"])
        summary = ", ".join(
            f"{f} {np.nanmedian(ratio[freq == f]):.3g}"
            for f in ("f", "c", "r")
            if np.isfinite(ratio[freq == f]).any()
        )
        logger.info("Gradient pos/neg ratio, median per group: %s; wrote %s", summary, paths)
        return paths

    # ------------------------------------------------------------------ checkpoint
    # Checkpoints are read with torch.load(weights_only=True): tensors only.
    def state_dict(self):
        if self._synced is None:
            return {} if self._loaded is None else {"stats": self._loaded.clone()}
        if comm.get_world_size() == 1:
            self._fold()  # no collective needed; otherwise after_step synced at this iteration
        return {"stats": self._synced.cpu().clone()}

    def load_state_dict(self, state):
        stats = state["stats"].to(torch.float64)
        if self._synced is None:
            self._loaded = stats.clone()  # applied when attach() knows the model
        elif stats.shape == self._synced.shape:
            self._synced.copy_(stats)
            self._local.zero_()
        else:
            logger.warning(
                "Gradient statistics of shape %s do not fit this model's %s; ignored",
                tuple(stats.shape),
                tuple(self._synced.shape),
            )


_LOSS_LABELS = {
    "softmax_ce": "CE",
    "sigmoid_ce": "sigmoid CE",
    "federated": "federated",
    "eql": "EQL",
    "eqlv2": "EQLv2",
}


def _loss_label(cfg) -> str:
    name = resolve_cls_loss(cfg)
    label = _LOSS_LABELS.get(name, name.capitalize())
    return label + (" + FASA" if cfg.MODEL.FASA.ENABLED else "")


def build_grad_stats_hook(cfg) -> Optional[GradientStatsHook]:
    """The hook if FASA_SEESAW.GRAD_STATS.ENABLED, else None."""
    if not cfg.FASA_SEESAW.GRAD_STATS.ENABLED:
        return None
    train = tuple(cfg.DATASETS.TRAIN)
    return GradientStatsHook(
        cfg.OUTPUT_DIR,
        category_info=functools.partial(
            category_table, train[0], cfg.MODEL.ROI_HEADS.NUM_CLASSES, train
        ),
        label=_loss_label(cfg),
        sync_period=cfg.SOLVER.CHECKPOINT_PERIOD,
    )
