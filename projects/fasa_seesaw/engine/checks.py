# Copyright (c) fasa_seesaw contributors.
"""
Pre-flight checks that turn common mistakes into one clear message before any model is built:
every project key against its domain (:mod:`.settings`), then the keys that must agree.
"""

import os

from detectron2.data import MetadataCatalog
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY

from ..errors import ConfigError
from ..modeling.cls_losses import resolve_cls_loss
from .settings import check_settings

__all__ = ["check_config", "check_output_dir", "check_test_datasets"]


def check_config(cfg):
    """Raise ConfigError naming the problem and the fix; returns None when all is well."""
    check_settings(cfg)
    check_model(cfg)
    if cfg.FASA_SEESAW.CHECK_NUM_CLASSES:
        check_num_classes(cfg)


def check_model(cfg):
    """The ROI head, its classification loss and FASA fit together."""
    from ..modeling.fast_rcnn import project_predictor_error
    from ..modeling.roi_heads import LongTailCascadeROIHeads, LongTailROIHeads

    head = cfg.MODEL.ROI_HEADS.NAME
    ours = (LongTailROIHeads, LongTailCascadeROIHeads)
    if head not in ROI_HEADS_REGISTRY:
        raise ConfigError(f"MODEL.ROI_HEADS.NAME {head!r} is not a registered ROI head.")
    if not issubclass(ROI_HEADS_REGISTRY.get(head), ours):
        extras = [
            key
            for key, on in (
                ("MODEL.FASA.ENABLED", cfg.MODEL.FASA.ENABLED),
                ("MODEL.ROI_BOX_HEAD.NORMED_CLASSIFIER", cfg.MODEL.ROI_BOX_HEAD.NORMED_CLASSIFIER),
                ("MODEL.ROI_BOX_HEAD.CLS_LOSS", cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS != "auto"),
                ("TEST.LVIS.TOPK_PER_CLASS", cfg.TEST.LVIS.TOPK_PER_CLASS > 0),
                ("FASA_SEESAW.GRAD_STATS.ENABLED", cfg.FASA_SEESAW.GRAD_STATS.ENABLED),
            )
            if on
        ]
        if extras:
            raise project_predictor_error(extras, f"MODEL.ROI_HEADS.NAME is {head!r}")
        return
    resolve_cls_loss(cfg)  # CLS_LOSS against USE_SIGMOID_CE / USE_FED_LOSS
    if cfg.MODEL.FASA.ENABLED and cfg.MODEL.ROI_BOX_HEAD.NUM_FC < 1:
        raise ConfigError(
            "FASA models the box head's last fully-connected feature, but "
            "MODEL.ROI_BOX_HEAD.NUM_FC is 0 (the head outputs a conv map). Set NUM_FC >= 1, "
            "or MODEL.FASA.ENABLED False."
        )


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


def check_test_datasets(cfg):
    """LVIS evaluation needs an LVIS-format json with frequency fields: check before training."""
    from ..data.datasets import validate_lvis_json

    for name in cfg.DATASETS.TEST:
        meta = MetadataCatalog.get(name)
        if meta.get("evaluator_type", None) != "lvis":
            raise ConfigError(
                f"Test dataset '{name}' has evaluator_type={meta.get('evaluator_type', None)!r}; "
                "this project evaluates LVIS-format datasets only. Register it with "
                "--dataset NAME=JSON:IMAGE_ROOT (or fasa_seesaw.data.register_lvis_json_dataset) "
                "and list it in DATASETS.TEST."
            )
        json_file = meta.get("json_file", None)
        if json_file and os.path.isfile(json_file):
            validate_lvis_json(json_file)


def check_output_dir(cfg, *, resume: bool):
    """Refuse to train over someone's checkpoints unless asked to resume them."""
    if resume:
        return
    existing = [
        f
        for f in ("model_final.pth", "last_checkpoint")
        if os.path.exists(os.path.join(cfg.OUTPUT_DIR, f))
    ]
    if existing:
        raise ConfigError(
            f"OUTPUT_DIR '{cfg.OUTPUT_DIR}' already holds {', '.join(existing)} from an earlier "
            "run. Pass --resume to continue that run, or choose another OUTPUT_DIR "
            "(e.g. append `OUTPUT_DIR output/new_run` to the command); nothing was overwritten."
        )
