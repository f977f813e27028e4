# Copyright (c) fasa_seesaw contributors.
"""Pre-flight checks that turn common mistakes into one clear message before any model is built."""

from detectron2.data import MetadataCatalog

from ..errors import ConfigError
from ..modeling.seesaw_loss import check_seesaw_params

__all__ = ["check_config"]

_SEESAW_HEADS = ("SeesawROIHeads", "SeesawCascadeROIHeads")


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
    if cfg.FASA_SEESAW.CHECK_NUM_CLASSES:
        check_num_classes(cfg)


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
