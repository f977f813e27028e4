# Copyright (c) fasa_seesaw contributors.
"""
Equalization Loss v2 (Tan et al., CVPR 2021): the math as plain torch functions, and
:class:`EQLv2Loss`, the module a box predictor holds (the accumulated gradient statistics, the
loss and the test-time activation), following the official code (tztztztztz/eqlv2,
mmdet/models/losses/eqlv2.py).

C + 1 sigmoid logits, the last an objectness (background) logit. Per class j the accumulated
positive and negative gradient magnitudes give g_j = pos_j / neg_j; with
f(x) = 1 / (1 + exp(-gamma (x - mu))) a negative term is weighted q_j = f(g_j) and a positive
one r_j = 1 + alpha (1 - q_j); the objectness column keeps weight 1. The statistics are updated
after each step's loss with |d BCE / d z| times the weight, summed over the batch, from the
analytic gradient (sigmoid(z) - y), as the official code does in its forward.

Free of host-device syncs in the loss and the update (the accuracy line costs one).
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from detectron2.utils import comm

from ..errors import ConfigError
from .eql_loss import check_prior_prob, init_prior_bias, log_class_accuracy, sigmoid_targets

__all__ = [
    "EQLv2Loss",
    "eqlv2_class_weights",
    "eqlv2_gradient_stats",
    "eqlv2_map",
    "eqlv2_probs",
    "eqlv2_weighted_bce",
]

# The official code's initial g_j, high enough that f(g_j) = 1: plain sigmoid CE until the first
# statistics are in.
INITIAL_RATIO = 100.0
# The official code's guard on neg_j in g_j = pos_j / (neg_j + 1e-10).
RATIO_EPS = 1e-10


def eqlv2_map(x: torch.Tensor, gamma: float, mu: float) -> torch.Tensor:
    """f(x) = 1 / (1 + exp(-gamma (x - mu)))."""
    return 1.0 / (1.0 + torch.exp(-gamma * (x - mu)))


def eqlv2_class_weights(pos_neg: torch.Tensor, gamma: float, mu: float, alpha: float):
    """
    (positive, negative) weights, each of shape (C + 1,): q_j = f(g_j), r_j = 1 + alpha (1 - q_j)
    for the C classes, and 1 for the objectness column.
    """
    neg_w = torch.cat([eqlv2_map(pos_neg, gamma, mu), pos_neg.new_ones(1)])
    return 1.0 + alpha * (1.0 - neg_w), neg_w


def eqlv2_weighted_bce(logits, gt_classes, pos_w, neg_w):
    """
    (weighted BCE (R, C + 1), targets, weights): targets one-hot over C + 1 columns (a background
    RoI's target is its objectness column), each entry weighted r_j if positive, q_j if negative.
    """
    logits = logits.float()
    target = sigmoid_targets(gt_classes, logits.shape[1], logits.dtype)
    weight = pos_w[None, :] * target + neg_w[None, :] * (1.0 - target)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return bce * weight, target, weight


def eqlv2_gradient_stats(logits, target, weight):
    """
    Per-class (positive, negative) gradient magnitudes of one batch, shape (C,) each: |sigmoid(z) -
    y| * weight summed over RoIs, split by the target; the objectness column is left out.
    """
    grad = (logits.detach().float().sigmoid() - target).abs() * weight
    pos = (grad * target).sum(dim=0)[:-1]
    neg = (grad * (1.0 - target)).sum(dim=0)[:-1]
    return pos, neg


def eqlv2_probs(logits: torch.Tensor, test_with_obj: bool = True) -> torch.Tensor:
    """
    Test-time (R, C + 1) scores as the official ``get_activation``: sigmoid of every logit, the
    class scores multiplied by (1 - sigmoid(objectness)) when ``test_with_obj``; the last column
    is the objectness sigmoid (the background score, which detectron2's inference ignores).
    """
    probs = logits.float().sigmoid()
    cls, bg = probs[:, :-1], probs[:, -1:]
    if test_with_obj:
        cls = cls * (1.0 - bg)
    return torch.cat([cls, bg], dim=1)


class EQLv2Loss(nn.Module):
    """
    The classification loss of a box predictor with C + 1 sigmoid logits (the last an objectness
    logit trained on every RoI). State (persistent buffers, so checkpoints carry it):
    ``pos_grad``, ``neg_grad`` (accumulated per-class gradient magnitudes) and ``pos_neg`` (their
    ratio, INITIAL_RATIO until the first update). With ``sync_stats`` each step's statistics are
    summed over all processes, as the official code does.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        gamma: float = 12.0,
        mu: float = 0.8,
        alpha: float = 4.0,
        loss_weight: float = 1.0,
        prior_prob: float = 0.001,
        test_with_obj: bool = True,
        sync_stats: bool = True,
    ):
        """
        Args:
            gamma, mu: slope and centre of the mapping f.
            alpha: positive weights are 1 + alpha (1 - q_j).
            loss_weight: weight of ``loss_cls``.
            prior_prob: initial sigmoid probability of every logit (classifier bias).
            test_with_obj: test-time class scores times (1 - objectness).
            sync_stats: sum each step's statistics over processes; False keeps them per process.
        """
        super().__init__()
        for name, value in (("GAMMA", gamma), ("MU", mu), ("ALPHA", alpha)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(
                    f"EQLv2: MODEL.EQLV2.{name}={value!r} is invalid; it must be a number >= 0 "
                    "(the paper uses gamma 12, mu 0.8, alpha 4)."
                )
        check_prior_prob("MODEL.EQLV2.PRIOR_PROB", prior_prob)
        self.num_classes = num_classes
        self.gamma, self.mu, self.alpha = float(gamma), float(mu), float(alpha)
        self.loss_weight = loss_weight
        self.prior_prob = float(prior_prob)
        self.test_with_obj = bool(test_with_obj)
        self.sync_stats = bool(sync_stats)
        self.register_buffer("pos_grad", torch.zeros(num_classes))
        self.register_buffer("neg_grad", torch.zeros(num_classes))
        self.register_buffer("pos_neg", torch.full((num_classes,), INITIAL_RATIO))

    @property
    def num_logits(self) -> int:
        """C classes + the objectness logit."""
        return self.num_classes + 1

    def init_classifier(self, layer: nn.Module) -> None:
        init_prior_bias(layer, self.prior_prob)

    def class_weights(self):
        return eqlv2_class_weights(self.pos_neg, self.gamma, self.mu, self.alpha)

    @torch.no_grad()
    def update_stats(self, logits, target, weight) -> None:
        """Add one batch's gradient magnitudes (of every process, if synced); g_j follows."""
        pos, neg = eqlv2_gradient_stats(logits, target, weight)
        rows = pos.new_full((1,), float(logits.shape[0]))
        delta = torch.cat([pos, neg, rows])
        if self.sync_stats and comm.get_world_size() > 1:
            dist.all_reduce(delta)
        C = self.num_classes
        self.pos_grad += delta[:C]
        self.neg_grad += delta[C : 2 * C]
        # A batch without RoIs anywhere (the official code never calls the loss then) keeps g.
        ratio = self.pos_grad / (self.neg_grad + RATIO_EPS)
        self.pos_neg.copy_(torch.where(delta[2 * C :] > 0, ratio, self.pos_neg))

    def forward(self, scores: torch.Tensor, gt_classes: torch.Tensor) -> dict:
        """The weighted ``loss_cls`` with the current weights, then this step's statistics."""
        with torch.autocast(device_type=scores.device.type, enabled=False):
            logits = scores.float()
            pos_w, neg_w = self.class_weights()
            terms, target, weight = eqlv2_weighted_bce(logits, gt_classes, pos_w, neg_w)
            loss = terms.sum() / max(logits.shape[0], 1)
            self.update_stats(logits, target, weight)
        log_class_accuracy(scores[:, : self.num_classes], gt_classes)
        return {"loss_cls": loss * self.loss_weight}

    def per_roi(self, scores: torch.Tensor, gt_classes: torch.Tensor) -> torch.Tensor:
        """Per-RoI weighted BCE over the C class columns with the current weights (the
        objectness column left out, as Seesaw's per_roi leaves its objectness out); no update."""
        with torch.autocast(device_type=scores.device.type, enabled=False):
            pos_w, neg_w = self.class_weights()
            terms, _, _ = eqlv2_weighted_bce(scores, gt_classes, pos_w, neg_w)
            return terms[:, : self.num_classes].sum(dim=1)

    def activation(self, scores: torch.Tensor) -> torch.Tensor:
        """Test-time (R, C+1) scores (:func:`eqlv2_probs`)."""
        return eqlv2_probs(scores, self.test_with_obj)

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, gamma={self.gamma}, mu={self.mu}, "
            f"alpha={self.alpha}, test_with_obj={self.test_with_obj}, "
            f"sync_stats={self.sync_stats}"
        )
