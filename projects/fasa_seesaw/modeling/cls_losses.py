# Copyright (c) fasa_seesaw contributors.
"""
The classification losses a box predictor can take (MODEL.ROI_BOX_HEAD.CLS_LOSS).

detectron2's own losses (softmax CE, sigmoid CE, federated) stay detectron2's code; the predictor
runs them when it has no loss module. Any other loss is a module built from ``(cfg, num_classes)``
by a function registered with ``@register_cls_loss(name)``, with this interface:

- ``num_logits``: outputs the classifier needs;
- ``forward(scores, gt_classes) -> dict``: the weighted losses (it may update its own state,
  e.g. class counts);
- ``per_roi(scores, gt_classes) -> (R,)``: per-RoI loss that changes no state (FASA's virtual
  rows and validation pass use it; background rows may hold any value);
- ``activation(scores) -> (R, C+1)``: test-time scores laid out like detectron2's softmax;
- optionally ``init_classifier(layer)``: initialises the classifier the predictor built (e.g.
  the sigmoid losses' prior-probability bias).
"""

from typing import Callable, Dict
from torch import nn

from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY

from ..errors import ConfigError
from .eql_loss import EQLLoss
from .eqlv2_loss import EQLv2Loss
from .seesaw_loss import SeesawLoss

__all__ = ["build_cls_loss", "cls_loss_names", "register_cls_loss", "resolve_cls_loss"]

# CLS_LOSS name -> builder(cfg, num_classes) of a loss module.
_BUILDERS: Dict[str, Callable[..., nn.Module]] = {}

# detectron2's built-in losses: (USE_SIGMOID_CE, USE_FED_LOSS).
DETECTRON2_LOSSES = {
    "softmax_ce": (False, False),
    "sigmoid_ce": (True, False),
    "federated": (True, True),
}


def register_cls_loss(name: str):
    """Decorator: register ``builder(cfg, num_classes) -> nn.Module`` as CLS_LOSS ``name``."""

    def decorator(builder):
        if name in _BUILDERS or name in DETECTRON2_LOSSES or name == "auto":
            raise ValueError(f"classification loss {name!r} is already registered")
        _BUILDERS[name] = builder
        return builder

    return decorator


@register_cls_loss("seesaw")
def build_seesaw_loss(cfg, num_classes):
    s = cfg.MODEL.SEESAW
    return SeesawLoss(
        num_classes,
        p=s.P,
        q=s.Q,
        eps=s.EPS,
        loss_weight=s.LOSS_WEIGHT,
        objectness_loss_weight=s.OBJECTNESS_LOSS_WEIGHT,
        sync_counts=s.SYNC_COUNTS,
    )


@register_cls_loss("eql")
def build_eql_loss(cfg, num_classes):
    from ..data.counts import image_frequency_of

    e = cfg.MODEL.EQL
    names = tuple(cfg.DATASETS.TRAIN)
    return EQLLoss(
        num_classes,
        lambda_=e.LAMBDA,
        loss_weight=e.LOSS_WEIGHT,
        prior_prob=e.PRIOR_PROB,
        image_frequency=lambda: image_frequency_of(names, num_classes),
    )


@register_cls_loss("eqlv2")
def build_eqlv2_loss(cfg, num_classes):
    e = cfg.MODEL.EQLV2
    return EQLv2Loss(
        num_classes,
        gamma=e.GAMMA,
        mu=e.MU,
        alpha=e.ALPHA,
        loss_weight=e.LOSS_WEIGHT,
        prior_prob=e.PRIOR_PROB,
        test_with_obj=e.TEST_WITH_OBJ,
        sync_stats=e.SYNC_STATS,
    )


def cls_loss_names():
    """Every CLS_LOSS value but "auto": detectron2's losses, then the registered modules."""
    return tuple(DETECTRON2_LOSSES) + tuple(sorted(_BUILDERS))


def resolve_cls_loss(cfg, default: str = "auto") -> str:
    """
    The loss name MODEL.ROI_BOX_HEAD.CLS_LOSS selects. "auto" is ``default`` if it is not "auto",
    else the ROI head's ``default_cls_loss`` ("seesaw" for the Seesaw heads), else detectron2's
    loss as USE_SIGMOID_CE / USE_FED_LOSS select it. Contradictory settings raise ConfigError.
    """
    box = cfg.MODEL.ROI_BOX_HEAD
    name = box.CLS_LOSS
    flags = (bool(box.USE_SIGMOID_CE), bool(box.USE_FED_LOSS))
    if name == "auto":
        name = default
    if name == "auto":
        head = ROI_HEADS_REGISTRY.get(cfg.MODEL.ROI_HEADS.NAME)
        name = getattr(head, "default_cls_loss", "auto")
        if name == "auto":
            return {v: k for k, v in DETECTRON2_LOSSES.items()}.get(flags, "softmax_ce")
    if name not in cls_loss_names():
        raise ConfigError(
            f"MODEL.ROI_BOX_HEAD.CLS_LOSS {name!r} is unknown; use one of "
            f"{['auto'] + list(cls_loss_names())}."
        )
    if name in DETECTRON2_LOSSES:
        if any(flags) and flags != DETECTRON2_LOSSES[name]:
            raise ConfigError(
                f"MODEL.ROI_BOX_HEAD.CLS_LOSS {name!r} contradicts USE_SIGMOID_CE={flags[0]}, "
                f"USE_FED_LOSS={flags[1]}. Set CLS_LOSS 'auto', or the two flags to "
                f"{DETECTRON2_LOSSES[name]}."
            )
    elif any(flags):
        raise ConfigError(
            f"MODEL.ROI_BOX_HEAD.CLS_LOSS {name!r} replaces detectron2's classification loss and "
            "cannot be combined with MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE or USE_FED_LOSS. Set both "
            "to False, or CLS_LOSS 'sigmoid_ce' / 'federated' for detectron2's losses."
        )
    return name


def build_cls_loss(cfg, name: str):
    """The loss module of ``name``; None for detectron2's built-in losses."""
    if name in DETECTRON2_LOSSES:
        return None
    return _BUILDERS[name](cfg, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
