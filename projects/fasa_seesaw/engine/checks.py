# Copyright (c) fasa_seesaw contributors.
"""Pre-flight checks that turn common mistakes into one clear message before any model is built."""

from detectron2.data import MetadataCatalog

from ..errors import ConfigError
from ..modeling.fasa_feature_bank import VARIANCES
from ..modeling.fasa_sampling import GROUP_SIGNALS
from ..modeling.seesaw_loss import check_seesaw_params

__all__ = ["check_config"]

_SEESAW_HEADS = ("SeesawROIHeads", "SeesawCascadeROIHeads")
_FASA_HEADS = _SEESAW_HEADS + ("FASAROIHeads", "FASACascadeROIHeads")


def check_config(cfg):
    """Raise ConfigError naming the problem and the fix; returns None when all is well."""
    if cfg.MODEL.ROI_HEADS.NAME in _SEESAW_HEADS:
        if cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE or cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS:
            raise ConfigError(
                f"{cfg.MODEL.ROI_HEADS.NAME} uses Seesaw Loss, a softmax loss; it cannot be "
                "combined with MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE or USE_FED_LOSS. Set both "
                "to False, or use StandardROIHeads/CascadeROIHeads for the sigmoid/federated loss."
            )
        check_seesaw_params(cfg.MODEL.SEESAW.P, cfg.MODEL.SEESAW.Q, cfg.MODEL.SEESAW.EPS)
    if cfg.MODEL.FASA.ENABLED and cfg.MODEL.ROI_HEADS.NAME not in _FASA_HEADS:
        raise ConfigError(
            f"MODEL.FASA.ENABLED is True but MODEL.ROI_HEADS.NAME is "
            f"{cfg.MODEL.ROI_HEADS.NAME!r}, which has no FASA. Use one of {list(_FASA_HEADS)} "
            "(FASAROIHeads/FASACascadeROIHeads keep detectron2's classification loss)."
        )
    if cfg.MODEL.FASA.ENABLED:
        check_fasa(cfg.MODEL.FASA)
        if cfg.MODEL.ROI_BOX_HEAD.NUM_FC < 1:
            raise ConfigError(
                "FASA models the box head's last fully-connected feature, but "
                "MODEL.ROI_BOX_HEAD.NUM_FC is 0 (the head outputs a conv map). Set NUM_FC >= 1, "
                "or MODEL.FASA.ENABLED False."
            )
    check_eval(cfg.FASA_SEESAW.EVAL)
    if cfg.FASA_SEESAW.CHECK_NUM_CLASSES:
        check_num_classes(cfg)


def check_eval(e):
    """FASA_SEESAW.EVAL, checked before training rather than at the first evaluation."""
    from ..evaluation.lvis_engines import ENGINES
    from ..evaluation.report import EXTRAS

    problems = []
    if e.ENGINE not in ENGINES:
        problems.append(f"FASA_SEESAW.EVAL.ENGINE {e.ENGINE!r} is unknown: use one of {ENGINES}")
    bad = [x for x in e.EXTRAS if x not in EXTRAS]
    if bad:
        problems.append(f"FASA_SEESAW.EVAL.EXTRAS has unknown {bad}: choose from {EXTRAS}")
    if e.FIXED_K <= 0:
        problems.append(f"FASA_SEESAW.EVAL.FIXED_K must be positive, got {e.FIXED_K}")
    if 0 < e.TOPK_PER_CLASS < e.FIXED_K:
        problems.append(
            f"FASA_SEESAW.EVAL.TOPK_PER_CLASS ({e.TOPK_PER_CLASS}) is below FIXED_K "
            f"({e.FIXED_K}): every class would count as having fewer than K; make them equal"
        )
    if e.TOPK_MAX_PER_IMAGE == 0 or e.TOPK_MAX_PER_IMAGE < -1:
        problems.append("FASA_SEESAW.EVAL.TOPK_MAX_PER_IMAGE must be positive or -1 (no cap)")
    if problems:
        raise ConfigError("; ".join(problems) + ".")


def check_fasa(c):
    from .fasa_hook import CLUSTERING

    problems = []
    if c.BANK_MODE not in ("ema", "exact"):
        problems.append(f"MODEL.FASA.BANK_MODE {c.BANK_MODE!r} is unknown: use 'ema' or 'exact'")
    if c.INIT_PROBS not in ("inverse_frequency", "uniform"):
        problems.append(
            f"MODEL.FASA.INIT_PROBS {c.INIT_PROBS!r} is unknown: use 'inverse_frequency' or "
            "'uniform'"
        )
    if not 0.0 < c.BANK_MOMENTUM <= 1.0:
        problems.append(f"MODEL.FASA.BANK_MOMENTUM must lie in (0, 1], got {c.BANK_MOMENTUM}")
    if c.SAMPLES_PER_CLASS < 1:
        problems.append(f"MODEL.FASA.SAMPLES_PER_CLASS must be >= 1, got {c.SAMPLES_PER_CLASS}")
    if c.BANK_VARIANCE not in VARIANCES:
        problems.append(
            f"MODEL.FASA.BANK_VARIANCE {c.BANK_VARIANCE!r} is unknown: use one of {list(VARIANCES)}"
        )
    if c.ADAPT.CLUSTERING not in CLUSTERING:
        problems.append(
            f"MODEL.FASA.ADAPT.CLUSTERING {c.ADAPT.CLUSTERING!r} is unknown: use one of "
            f"{list(CLUSTERING)}"
        )
    if c.ADAPT.GROUP_SIGNAL not in GROUP_SIGNALS:
        problems.append(
            f"MODEL.FASA.ADAPT.GROUP_SIGNAL {c.ADAPT.GROUP_SIGNAL!r} is unknown: use one of "
            f"{list(GROUP_SIGNALS)}"
        )
    if c.ADAPT.BANDWIDTH < 0 or (
        c.ADAPT.BANDWIDTH == 0 and not 0.0 < c.ADAPT.BANDWIDTH_QUANTILE <= 1.0
    ):
        problems.append(
            "MODEL.FASA.ADAPT.BANDWIDTH must be > 0 (fixed) or 0 with BANDWIDTH_QUANTILE in "
            f"(0, 1]; got {c.ADAPT.BANDWIDTH} and {c.ADAPT.BANDWIDTH_QUANTILE}"
        )
    if not 0.5 <= c.ADAPT.AFFINITY_DAMPING < 1.0:
        problems.append(
            "MODEL.FASA.ADAPT.AFFINITY_DAMPING must lie in [0.5, 1), got "
            f"{c.ADAPT.AFFINITY_DAMPING}"
        )
    if c.ADAPT.SIGNAL not in ("loss", "metric"):
        problems.append(
            f"MODEL.FASA.ADAPT.SIGNAL {c.ADAPT.SIGNAL!r} is unknown: use 'loss' or 'metric'"
        )
    if not c.ADAPT.HELDOUT_DATASET and not 0.0 < c.ADAPT.HELDOUT_FRACTION < 1.0:
        problems.append(
            f"MODEL.FASA.ADAPT.HELDOUT_FRACTION must lie in (0, 1), got {c.ADAPT.HELDOUT_FRACTION}"
        )
    if c.LOSS_WEIGHT < 0:
        problems.append(f"MODEL.FASA.LOSS_WEIGHT must be >= 0, got {c.LOSS_WEIGHT}")
    if problems:
        raise ConfigError("; ".join(problems) + ".")


def check_num_classes(cfg):
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    for name in tuple(cfg.DATASETS.TRAIN) + tuple(cfg.DATASETS.TEST):
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None and len(classes) != num_classes:
            raise ConfigError(
                f"MODEL.ROI_HEADS.NUM_CLASSES is {num_classes} but dataset '{name}' has "
                f"{len(classes)} categories. Set MODEL.ROI_HEADS.NUM_CLASSES {len(classes)} "
                "(on the command line or in the yaml), or use a dataset with that many categories."
            )
