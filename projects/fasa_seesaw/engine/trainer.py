# Copyright (c) fasa_seesaw contributors.
"""
The trainer of ``train_net.py``: detectron2's DefaultTrainer with the project's LVIS evaluator,
top-K-per-class inference, a training data stream that resumes where it stopped, and the
project's hooks (FASA adaptation, gradient statistics, random-state checkpoints, progress).
"""

import contextlib
import logging
import os
from collections import OrderedDict
import torch

import detectron2.utils.comm as comm
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.engine.hooks import EvalHook, PeriodicCheckpointer
from detectron2.evaluation import inference_on_dataset

from ..data import prepare_datasets
from ..data.counts import epoch_iterations
from ..data.heldout import base_dataset
from ..data.resize import build_mapper
from ..data.resumable import resumable_training_dataset
from ..errors import ConfigError, user_message
from ..evaluation import LongTailLVISEvaluator, PerCategoryAPEvaluator
from ..evaluation.topk_inference import per_class_score_floor
from ..modeling.dual_head import freeze_for_dual_head, non_dual_head_keys
from ..modeling.tta import build_tta_model, tta_test_mapper
from .checkpoint import CrashSafeCheckpointer, check_resume_files, final_iteration
from .fasa_hook import FASAAdaptationHook
from .grad_stats import build_grad_stats_hook
from .hooks import ProgressHook, RNGStateHook

__all__ = ["Trainer"]

logger = logging.getLogger(__name__)


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        with _ddp_on_the_model_device():
            super().__init__(cfg)

    @property
    def last_eval_results(self):
        """The results of the last evaluation during training (None if there was none)."""
        return getattr(self, "_last_eval_results", None)

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        if cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED:
            freeze_for_dual_head(model)
        return model

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return LongTailLVISEvaluator.from_config(cfg, dataset_name, output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        if cfg.TEST.LVIS.TOPK_PER_CLASS <= 0:
            return super().test(cfg, model, evaluators)
        # Top-K-per-class inference (AP-Fixed / AP-Pool): no per-image cap, and each class's
        # scores must beat the K-th best that class has collected so far.
        if evaluators is None:
            evaluators = [cls.build_evaluator(cfg, name) for name in cfg.DATASETS.TEST]
        if not isinstance(evaluators, (list, tuple)):
            evaluators = [evaluators]
        if len(evaluators) != len(cfg.DATASETS.TEST):
            raise ValueError(f"{len(evaluators)} evaluators for {len(cfg.DATASETS.TEST)} datasets")
        results = OrderedDict()
        for name, evaluator in zip(cfg.DATASETS.TEST, evaluators):
            one = cfg.clone()
            one.defrost()
            one.DATASETS.TEST = (name,)
            cap = cfg.TEST.LVIS.TOPK_MAX_PER_IMAGE
            with per_class_score_floor(model, evaluator.score_floor, cap):
                results[name] = super().test(one, model, [evaluator])
        return results if len(results) != 1 else next(iter(results.values()))

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluate ``model`` with test-time augmentation (TEST.AUG); the results' top-level
        keys get "_TTA" appended (bbox_TTA, segm_TTA; or <dataset>_TTA with several test sets),
        and the files go to OUTPUT_DIR/inference_TTA/<dataset>."""
        logger.info("Running inference with test-time augmentation ...")
        tta = build_tta_model(cfg, model)
        evaluators = [
            cls.build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference_TTA", name))
            for name in cfg.DATASETS.TEST
        ]
        results = _OriginalSizeTestLoader.test(cfg, tta, evaluators)
        return OrderedDict((k + "_TTA", v) for k, v in results.items())

    @classmethod
    def build_train_loader(cls, cfg):
        # Built-in synthetic datasets are generated on first use: do it once, on one process.
        prepare_on_main_process(cfg.DATASETS.TRAIN)
        # detectron2's own dataset, mapper and sampler choice, wrapped so that --resume re-enters
        # the data stream exactly where the run stopped (fasa_seesaw.data.resumable).
        args = build_detection_train_loader.from_config(cfg, mapper=build_mapper(cfg, True))
        dataset, positions = resumable_training_dataset(
            args["dataset"],
            args["mapper"],
            args["sampler"],
            seed=cfg.SEED,
            names=cfg.DATASETS.TRAIN,
        )
        loader = build_detection_train_loader(
            dataset=dataset,
            mapper=None,
            sampler=None,
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
            # The loader's own generator seeds its workers, so starting it (at iteration 0, or
            # right after a resume) draws nothing from the main RNG that training uses.
            seed=cfg.SEED if cfg.SEED >= 0 else 0,
        )
        loader.data_positions = positions
        if cfg.DATALOADER.ASPECT_RATIO_GROUPING:  # the orientations a resume replays groups from
            loader.data_wide = [d["width"] > d["height"] for d in args["dataset"]]
        return loader

    def train(self):
        with _no_traceback_for(ConfigError):
            return super().train()

    def resume_or_load(self, resume=True):
        if resume:
            check_resume_files(self.cfg.OUTPUT_DIR, clean=comm.is_main_process())
        resumed = resume and self.checkpointer.has_checkpoint()
        super().resume_or_load(resume=resume)
        shapes = getattr(self.checkpointer.incompatible, "incorrect_shapes", None)
        if not resumed and shapes:
            logger.info(
                "Fine-tuning from MODEL.WEIGHTS: %d tensors of another shape (%s) start from "
                "their initialisation, as detectron2 does when the classes differ; --eval-only "
                "refuses such weights.",
                len(shapes),
                ", ".join(s[0] for s in shapes[:4]) + (", ..." if len(shapes) > 4 else ""),
            )
        if not resumed and self.cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED:
            self._check_dual_head_start()
        if resumed and self.start_iter >= self.max_iter:
            self._complete_final_checkpoint()
        positions = getattr(self.data_loader, "data_positions", None)
        if positions is not None:
            per_process = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
            wide = getattr(self.data_loader, "data_wide", None)
            positions.resume_at_batch(self.start_iter, per_process, wide)

    def _check_dual_head_start(self):
        """The dual-head stage starts from a trained model: MODEL.WEIGHTS must fill every part
        of it but the new classifiers."""
        weights = self.cfg.MODEL.WEIGHTS
        inc = self.checkpointer.incompatible
        missing = non_dual_head_keys(inc.missing_keys) if inc is not None else []
        shapes = [k for k, _, _ in inc.incorrect_shapes] if inc is not None else []
        if weights and not missing and not shapes:
            return
        found = ", ".join((missing + shapes)[:4]) + (", ..." if len(missing + shapes) > 4 else "")
        raise ConfigError(
            "MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED trains a second classifier on a trained model, "
            f"but MODEL.WEIGHTS {weights!r} "
            + (f"does not fill the model ({found})" if weights else "is empty")
            + ". Set MODEL.WEIGHTS to the first stage's model_final.pth, trained with the same "
            "config but DUAL_HEAD.ENABLED False."
        )

    def _complete_final_checkpoint(self):
        """
        A run that stopped while writing model_final.pth resumes at MAX_ITER from the periodic
        checkpoint of the last iteration, which holds the same state: write model_final.pth
        again from it unless a complete one of that iteration is there. A checkpoint of a later
        iteration (a run extended, then resumed with the shorter schedule) writes nothing.
        """
        path = os.path.join(self.cfg.OUTPUT_DIR, "model_final.pth")
        if self.iter != self.max_iter - 1:  # a checkpoint from past MAX_ITER: not this run's end
            logger.warning(
                "The last checkpoint is at iteration %d, past SOLVER.MAX_ITER %d: nothing is "
                "trained and model_final.pth is left as it is.",
                self.iter,
                self.max_iter,
            )
            return
        if not self.checkpointer.save_to_disk or final_iteration(path) == self.iter:
            return
        logger.info("model_final.pth is missing or older than iteration %d: writing it.", self.iter)
        self.checkpointer.save("model_final", iteration=self.iter)  # as PeriodicCheckpointer

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        prepare_on_main_process([dataset_name])
        return build_detection_test_loader(cfg, dataset_name, mapper=build_mapper(cfg, False))

    def build_hooks(self):
        # Atomic checkpoint files: swapped in before detectron2's hooks take the checkpointer.
        self.checkpointer = CrashSafeCheckpointer.replacing(self.checkpointer)
        hooks = super().build_hooks()
        cfg = self.cfg
        # Stateful hooks run before the checkpointer, so checkpoints hold their state.
        fasa = cfg.MODEL.FASA
        if fasa.ENABLED and fasa.ADAPT.ENABLED:
            prepare_on_main_process([fasa.ADAPT.HELDOUT_DATASET])
            period = fasa.ADAPT.PERIOD
            if period < 0:
                period = epoch_iterations(
                    cfg.DATASETS.TRAIN, cfg.SOLVER.IMS_PER_BATCH, cfg.MODEL.ROI_HEADS.NUM_CLASSES
                )
            metric_fn = heldout_ap_fn(cfg) if fasa.ADAPT.SIGNAL == "metric" else None
            hook = FASAAdaptationHook.from_config(
                cfg, fasa.ADAPT.HELDOUT_DATASET, period, metric_fn=metric_fn
            )
            hooks.insert(_checkpointer_index(hooks), hook)
        grad_stats = build_grad_stats_hook(cfg)
        if grad_stats is not None:
            hooks.insert(_checkpointer_index(hooks), grad_stats)
        rng = RNGStateHook(cfg.SOLVER.CHECKPOINT_PERIOD, cfg.SOLVER.MAX_ITER)
        hooks.insert(_checkpointer_index(hooks), rng)
        period = cfg.FASA_SEESAW.PROGRESS_PERIOD
        if period > 0:
            # Before the writer, which is the last hook.
            hooks.insert(len(hooks) - 1, ProgressHook(period, cfg.SOLVER.MAX_ITER))
        return hooks


class _OriginalSizeTestLoader(Trainer):
    """The trainer's test loop with images at their original size (test-time augmentation
    resizes each of its scales from the original pixels)."""

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        prepare_on_main_process([dataset_name])
        return build_detection_test_loader(cfg, dataset_name, mapper=tta_test_mapper(cfg))


class _DropTraceback(logging.Filter):
    """Keeps the log line (log.txt says why the run stopped) without the traceback."""

    def __init__(self, kinds):
        super().__init__()
        self.kinds = kinds

    def filter(self, record):
        if record.exc_info and issubclass(record.exc_info[0], self.kinds):
            record.msg = f"{record.getMessage()} {user_message(record.exc_info[1])}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


@contextlib.contextmanager
def _no_traceback_for(*kinds):
    """
    detectron2's training loop logs every exception with its traceback before re-raising it; a
    ConfigError (a bad file or setting, found during training) is reported once, as one message,
    by train_net.py instead.
    """
    log = logging.getLogger("detectron2.engine.train_loop")
    f = _DropTraceback(kinds)
    log.addFilter(f)
    try:
        yield
    finally:
        log.removeFilter(f)


@contextlib.contextmanager
def _ddp_on_the_model_device():
    """
    detectron2's DefaultTrainer wraps the model with create_ddp_model, which hands
    DistributedDataParallel the process's GPU (device_ids); a model on the CPU (gloo) needs
    device_ids None. The wrapper is swapped for the trainer's constructor only.
    """
    import detectron2.engine.defaults as defaults

    original = defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if next(model.parameters()).device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        defaults.create_ddp_model = original


def _checkpointer_index(hooks):
    """Where stateful hooks go: before the checkpointer, which only the main process has."""
    for i, h in enumerate(hooks):
        if isinstance(h, (PeriodicCheckpointer, EvalHook)):
            return i
    return len(hooks)


def heldout_ap_fn(cfg):
    """FASA's metric signal: per-category box AP on the held-out set, the same on all processes."""
    name = cfg.MODEL.FASA.ADAPT.HELDOUT_DATASET
    evaluator = PerCategoryAPEvaluator(name, max_dets=cfg.TEST.DETECTIONS_PER_IMAGE)
    loader = build_detection_test_loader(cfg, name, mapper=build_mapper(cfg, False))

    def fn(model):
        ap = inference_on_dataset(model, loader, evaluator).get("per_category_ap")
        box = [ap]
        if comm.get_world_size() > 1:
            torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    return fn


def prepare_on_main_process(dataset_names):
    """Generate lazily generated datasets on the main process; the others wait."""
    if comm.is_main_process():
        prepare_datasets([base_dataset(n) for n in dataset_names])
    comm.synchronize()
