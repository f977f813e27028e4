# Copyright (c) fasa_seesaw contributors.
"""
Pre-flight checks that turn common mistakes into one clear message before any model is built:
every project key against its domain (:mod:`.settings`), then the keys that must agree.
"""

import logging
import os
import tempfile
import time

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY

from ..errors import ConfigError, registered_subclass
from ..modeling.cls_losses import resolve_cls_loss
from .settings import check_settings

__all__ = ["check_config", "check_datasets", "check_output_dir", "check_test_datasets"]

logger = logging.getLogger(__name__)


def check_config(cfg):
    """Raise ConfigError naming the problem and the fix; returns None when all is well."""
    from ..modeling.tta import check_tta

    check_settings(cfg)
    check_tta(cfg)
    check_schedule(cfg.SOLVER)
    check_model(cfg)
    if cfg.FASA_SEESAW.CHECK_NUM_CLASSES:
        check_num_classes(cfg)


def check_schedule(solver):
    """An LR step at MAX_ITER passes detectron2's filter (it drops steps beyond MAX_ITER) and
    then fails deep inside fvcore's scheduler."""
    if solver.LR_SCHEDULER_NAME == "WarmupMultiStepLR" and solver.MAX_ITER in tuple(solver.STEPS):
        raise ConfigError(
            f"SOLVER.STEPS {tuple(solver.STEPS)} has a step at SOLVER.MAX_ITER {solver.MAX_ITER}, "
            "where training ends: move it below MAX_ITER or remove it."
        )


def check_model(cfg):
    """The proposal generator, the ROI head, its classification loss and FASA fit together."""
    from ..modeling.fast_rcnn import project_predictor_error
    from ..modeling.nms_resampling import LongTailRPN
    from ..modeling.roi_heads import LongTailCascadeROIHeads, LongTailROIHeads

    generator = cfg.MODEL.PROPOSAL_GENERATOR.NAME
    if cfg.MODEL.RPN.NMS_RESAMPLING.ENABLED and not registered_subclass(
        PROPOSAL_GENERATOR_REGISTRY, generator, LongTailRPN
    ):
        raise ConfigError(
            f"MODEL.RPN.NMS_RESAMPLING.ENABLED needs MODEL.PROPOSAL_GENERATOR.NAME 'LongTailRPN' "
            f"(detectron2's RPN with NMS re-sampling); it is {generator!r}."
        )
    head = cfg.MODEL.ROI_HEADS.NAME
    ours = (LongTailROIHeads, LongTailCascadeROIHeads)
    if head not in ROI_HEADS_REGISTRY:
        raise ConfigError(f"MODEL.ROI_HEADS.NAME {head!r} is not a registered ROI head.")
    check_global_context(cfg, ROI_HEADS_REGISTRY.get(head))
    if not issubclass(ROI_HEADS_REGISTRY.get(head), ours):
        extras = [
            key
            for key, on in (
                ("MODEL.FASA.ENABLED", cfg.MODEL.FASA.ENABLED),
                ("MODEL.ROI_BOX_HEAD.NORMED_CLASSIFIER", cfg.MODEL.ROI_BOX_HEAD.NORMED_CLASSIFIER),
                ("MODEL.ROI_BOX_HEAD.CLS_LOSS", cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS != "auto"),
                ("TEST.LVIS.TOPK_PER_CLASS", cfg.TEST.LVIS.TOPK_PER_CLASS > 0),
                ("FASA_SEESAW.GRAD_STATS.ENABLED", cfg.FASA_SEESAW.GRAD_STATS.ENABLED),
                ("MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED", cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED),
            )
            if on
        ]
        if extras:
            raise project_predictor_error(extras, f"MODEL.ROI_HEADS.NAME is {head!r}")
        return
    resolve_cls_loss(cfg)  # CLS_LOSS against USE_SIGMOID_CE / USE_FED_LOSS
    if cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED:
        if not cfg.MODEL.WEIGHTS:
            raise ConfigError(
                "MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED trains a second classifier on a trained "
                "model, but MODEL.WEIGHTS is empty: set it to the first stage's model_final.pth."
            )
        if cfg.MODEL.FASA.ENABLED:
            raise ConfigError(
                "The dual-head stage trains a second classifier on a frozen model; FASA cannot be "
                "part of it. Set MODEL.FASA.ENABLED False for that stage."
            )
    if cfg.MODEL.FASA.ENABLED and cfg.MODEL.ROI_BOX_HEAD.NUM_FC < 1:
        raise ConfigError(
            "FASA models the box head's last fully-connected feature, but "
            "MODEL.ROI_BOX_HEAD.NUM_FC is 0 (the head outputs a conv map). Set NUM_FC >= 1, "
            "or MODEL.FASA.ENABLED False."
        )


def check_global_context(cfg, head_class):
    """HTC-Lite's context encoder lives in the cascade head and (federated targets) needs the
    meta-architecture that hands it the images' negative categories."""
    from ..modeling.global_context import GlobalContextRCNN
    from ..modeling.roi_heads import LongTailCascadeROIHeads

    c = cfg.MODEL.GLOBAL_CONTEXT
    if not c.ENABLED:
        return
    if not issubclass(head_class, LongTailCascadeROIHeads):
        raise ConfigError(
            "MODEL.GLOBAL_CONTEXT.ENABLED (HTC-Lite's context encoder) runs in the cascade ROI "
            f"head; MODEL.ROI_HEADS.NAME is {cfg.MODEL.ROI_HEADS.NAME!r}. Set it to "
            "'LongTailCascadeROIHeads' (or start from an htc_lite config)."
        )
    arch = cfg.MODEL.META_ARCHITECTURE
    if c.TARGET == "federated" and not registered_subclass(
        META_ARCH_REGISTRY, arch, GlobalContextRCNN
    ):
        raise ConfigError(
            "MODEL.GLOBAL_CONTEXT.TARGET 'federated' needs each image's neg_category_ids, which "
            f"{arch!r} does not pass to the ROI heads: set MODEL.META_ARCHITECTURE "
            "'GlobalContextRCNN' (or TARGET 'exhaustive' for exhaustively labelled data)."
        )
    if c.RESIDUAL and c.NUM_CONVS % 2:
        raise ConfigError(
            f"MODEL.GLOBAL_CONTEXT.RESIDUAL groups the convolutions two by two, but NUM_CONVS is "
            f"{c.NUM_CONVS}: make it even (mmdetection's SCNet: 4) or set RESIDUAL False."
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


def check_datasets(cfg, train: bool = True):
    """Every dataset the config names (only the test ones when not ``train``) is registered, and
    its json exists or is generated on first use; then the test sets are checked for LVIS."""
    from ..data.datasets import BUILTIN_DATASETS
    from ..data.heldout import base_dataset

    splits = (("DATASETS.TRAIN", cfg.DATASETS.TRAIN),) if train else ()
    for key, names in splits + (("DATASETS.TEST", cfg.DATASETS.TEST),):
        for name in names:
            if name not in DatasetCatalog.list():
                raise ConfigError(
                    f"{key} names '{name}', which is not a registered dataset. Register an "
                    "LVIS-format json with --dataset NAME=JSON:IMAGE_ROOT, or use a built-in one "
                    f"(e.g. {', '.join(sorted(BUILTIN_DATASETS)[:3])}, lvis_v1_train)."
                )
            json_file = MetadataCatalog.get(name).get("json_file", None)
            generated = base_dataset(name) in BUILTIN_DATASETS  # written on first use
            if json_file and not generated and not os.path.isfile(json_file):
                raise ConfigError(
                    f"{key}: the json of dataset '{name}', {json_file}, does not exist. For "
                    "detectron2's datasets set $DETECTRON2_DATASETS to the folder that holds them "
                    "(see detectron2's datasets/README.md); else register the json with --dataset."
                )
    check_test_datasets(cfg)


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
    """
    OUTPUT_DIR is a writable folder; training refuses to overwrite someone's checkpoints unless
    asked to resume them, and the records of an earlier run that never wrote a checkpoint are
    set aside (renamed), so the new run's records are not appended to them.
    """
    out = cfg.OUTPUT_DIR
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"OUTPUT_DIR '{out}' is a file, not a folder; choose another OUTPUT_DIR.")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ConfigError(
            f"OUTPUT_DIR '{out}' cannot be written ({e.strerror or e}); choose another OUTPUT_DIR "
            "(e.g. append `OUTPUT_DIR output/new_run` to the command)."
        ) from None
    if resume and os.path.exists(os.path.join(out, "last_checkpoint")):
        return
    # Any checkpoint: a periodic one (model_0000999.pth) of a run whose last_checkpoint is gone
    # would be overwritten by the new run's as surely as model_final.pth.
    existing = [
        f for f in ("model_final.pth", "last_checkpoint") if os.path.exists(os.path.join(out, f))
    ] + sorted(f for f in os.listdir(out) if f.endswith(".pth") and f != "model_final.pth")
    if existing and resume:  # model_final.pth without a last_checkpoint to name it
        raise ConfigError(
            f"--resume found no last_checkpoint in OUTPUT_DIR '{out}', but {_names(existing)} "
            "is there. To continue from one, write its name into OUTPUT_DIR/last_checkpoint; to "
            "start again, choose another OUTPUT_DIR. Nothing was overwritten."
        )
    if existing:
        raise ConfigError(
            f"OUTPUT_DIR '{out}' already holds {_names(existing)} from an earlier "
            "run. Pass --resume to continue that run, or choose another OUTPUT_DIR "
            "(e.g. append `OUTPUT_DIR output/new_run` to the command); nothing was overwritten."
        )
    set_aside_records(out)


def _names(files, shown=3):
    """'a, b, c and 4 more'."""
    more = len(files) - shown
    return ", ".join(files[:shown]) + (f" and {more} more" if more > 0 else "")


# Files detectron2 and the project append to during training.
RUN_RECORDS = ("metrics.json", "fasa_adaptation.jsonl")


def set_aside_records(out: str) -> None:
    """Rename the appended-to records of an earlier run in ``out`` (``metrics.json`` becomes
    ``metrics.earlier-<date-time>.json``), so a run that starts from iteration 0 writes its own."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in RUN_RECORDS:
        path = os.path.join(out, name)
        if os.path.exists(path):
            stem, ext = os.path.splitext(name)
            new, n = os.path.join(out, f"{stem}.earlier-{stamp}{ext}"), 1
            while os.path.exists(new):  # never over an earlier set-aside of the same second
                new, n = os.path.join(out, f"{stem}.earlier-{stamp}-{n}{ext}"), n + 1
            try:
                os.replace(path, new)
            except FileNotFoundError:  # another machine on a shared folder set it aside first
                continue
            logger.warning("%s holds an earlier run's records: renamed %s.", path, new)
