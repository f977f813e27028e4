#!/usr/bin/env python
# Copyright (c) fasa_seesaw contributors.
"""
Train and evaluate Mask R-CNN / Cascade Mask R-CNN with Seesaw Loss on LVIS-format data.

    python train_net.py --config-file configs/quickstart/mask_rcnn_R_18_FPN_seesaw_quickstart.yaml
    python train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file CONFIG --num-gpus 8 --resume
"""

import logging
import os
import sys
import time
from collections import OrderedDict
import torch

import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.data.build import _train_loader_from_config
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.engine.hooks import EvalHook, PeriodicCheckpointer
from detectron2.evaluation import inference_on_dataset, verify_results
from detectron2.utils.logger import setup_logger

from fasa_seesaw import ConfigError, add_fasa_seesaw_config
from fasa_seesaw.data import prepare_datasets
from fasa_seesaw.data.counts import epoch_iterations
from fasa_seesaw.data.datasets import validate_lvis_json
from fasa_seesaw.data.heldout import base_dataset
from fasa_seesaw.data.resumable import resumable_training_dataset
from fasa_seesaw.engine import FASAAdaptationHook, ProgressHook, RNGStateHook, check_config
from fasa_seesaw.engine.fasa_hook import configure_fasa_heldout
from fasa_seesaw.engine.grad_stats import build_grad_stats_hook
from fasa_seesaw.evaluation import LongTailLVISEvaluator, PerCategoryAPEvaluator
from fasa_seesaw.evaluation.topk_inference import per_class_score_floor

logger = logging.getLogger("fasa_seesaw.train_net")


class Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return LongTailLVISEvaluator.from_config(cfg, dataset_name, output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        if cfg.FASA_SEESAW.EVAL.TOPK_PER_CLASS <= 0:
            return super().test(cfg, model, evaluators)
        # Top-K-per-class inference (AP-Fixed / AP-Pool): no per-image cap, and each class's
        # scores must beat the K-th best that class has collected so far.
        if evaluators is None:
            evaluators = [cls.build_evaluator(cfg, name) for name in cfg.DATASETS.TEST]
        if not isinstance(evaluators, (list, tuple)):
            evaluators = [evaluators]
        if len(evaluators) != len(cfg.DATASETS.TEST):
            raise ValueError(f"{len(evaluators)} evaluators for {len(cfg.DATASETS.TEST)} datasets")
        if not evaluators:
            return {}
        results = OrderedDict()
        for name, evaluator in zip(cfg.DATASETS.TEST, evaluators):
            one = cfg.clone()
            one.defrost()
            one.DATASETS.TEST = (name,)
            with per_class_score_floor(
                evaluator.score_floor, cfg.FASA_SEESAW.EVAL.TOPK_MAX_PER_IMAGE
            ):
                results[name] = super().test(one, model, [evaluator])
        return results if len(results) > 1 else next(iter(results.values()))

    @classmethod
    def build_train_loader(cls, cfg):
        # Built-in synthetic datasets are generated on first use: do it once, on one process.
        _prepare_on_main_process(cfg.DATASETS.TRAIN)
        # detectron2's own dataset, mapper and sampler choice, wrapped so that --resume re-enters
        # the data stream exactly where the run stopped (fasa_seesaw.data.resumable).
        args = _train_loader_from_config(cfg)
        dataset, positions = resumable_training_dataset(
            args["dataset"], args["mapper"], args["sampler"], seed=cfg.SEED
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
        return loader

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        positions = getattr(self._trainer.data_loader, "data_positions", None)
        if positions is not None:
            positions.start = self.start_iter * (
                self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
            )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        _prepare_on_main_process([dataset_name])
        return build_detection_test_loader(cfg, dataset_name)

    def build_hooks(self):
        hooks = super().build_hooks()
        fasa = self.cfg.MODEL.FASA
        if fasa.ENABLED and fasa.ADAPT.ENABLED:
            _prepare_on_main_process([fasa.ADAPT.HELDOUT_DATASET])
            period = fasa.ADAPT.PERIOD
            if period < 0:
                period = epoch_iterations(
                    self.cfg.DATASETS.TRAIN,
                    self.cfg.SOLVER.IMS_PER_BATCH,
                    self.cfg.MODEL.ROI_HEADS.NUM_CLASSES,
                )
            hook = FASAAdaptationHook.from_config(
                self.cfg,
                fasa.ADAPT.HELDOUT_DATASET,
                period,
                metric_fn=heldout_ap_fn(self.cfg) if fasa.ADAPT.SIGNAL == "metric" else None,
            )
            # Stateful: runs before the checkpointer so checkpoints hold the adapted state.
            hooks.insert(_checkpointer_index(hooks), hook)
        grad_stats = build_grad_stats_hook(self.cfg)
        if grad_stats is not None:  # stateful: before the checkpointer
            hooks.insert(_checkpointer_index(hooks), grad_stats)
        hooks.insert(_checkpointer_index(hooks), RNGStateHook())
        period = self.cfg.FASA_SEESAW.PROGRESS_PERIOD
        if period > 0:
            # Before the writer, which is the last hook.
            hooks.insert(len(hooks) - 1, ProgressHook(period, self.cfg.SOLVER.MAX_ITER))
        return hooks


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
    loader = build_detection_test_loader(cfg, name)

    def fn(model):
        ap = inference_on_dataset(model, loader, evaluator).get("per_category_ap")
        box = [ap]
        if comm.get_world_size() > 1:
            torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    return fn


def _prepare_on_main_process(dataset_names):
    if comm.is_main_process():
        prepare_datasets([base_dataset(n) for n in dataset_names])
    comm.synchronize()


def setup(args):
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    configure_fasa_heldout(cfg)
    cfg.freeze()
    return cfg


def check_output_dir(cfg, args):
    """Refuse to train over someone's checkpoints unless asked to resume them."""
    if args.eval_only or args.resume:
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


def main(args):
    cfg = setup(args)
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="fasa_seesaw")
    check_config(cfg)

    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        print_summary(res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # DefaultTrainer.train returns results only when TEST.EXPECTED_RESULTS is set.
    res = getattr(trainer, "_last_eval_results", None)
    print_summary(res)
    return res


def print_summary(results):
    """One readable block with AP, APr, APc, APf for boxes and masks."""
    if not comm.is_main_process() or not results:
        return
    # DefaultTrainer.test flattens the dict when there is a single test dataset.
    by_dataset = {"": results} if "bbox" in results or "segm" in results else results
    keys = ("AP", "AP50", "AP75", "APr", "APc", "APf")
    lines = ["", "Summary (LVIS metrics, %):"]
    for name, res in by_dataset.items():
        for task in ("bbox", "segm"):
            if task in res:
                row = "  ".join(f"{k} {res[task].get(k, float('nan')):6.2f}" for k in keys)
                lines.append(f"  {name + ' ' if name else ''}{task:4s}  {row}")
    print("\n".join(lines), flush=True)


def check_test_datasets(cfg):
    """LVIS evaluation needs an LVIS-format json with frequency fields: check before training."""
    for name in cfg.DATASETS.TEST:
        meta = MetadataCatalog.get(name)
        if meta.get("evaluator_type", None) != "lvis":
            raise ConfigError(
                f"Test dataset '{name}' has evaluator_type={meta.get('evaluator_type', None)!r}; "
                "this project evaluates LVIS-format datasets only. Register it with "
                "fasa_seesaw.data.register_lvis_json_dataset and list it in DATASETS.TEST."
            )
        json_file = meta.get("json_file", None)
        if json_file and os.path.isfile(json_file):
            validate_lvis_json(json_file)


def preflight(args):
    """Validate the config in the launching process, so errors come before any worker starts."""
    try:
        cfg = setup(args)
    except (ValueError, KeyError, AssertionError) as e:
        if isinstance(e, ConfigError):
            raise
        hint = ""
        if "Type mismatch" in str(e):
            hint = " Floating-point keys need a decimal point (e.g. MODEL.SEESAW.Q 0.0)."
        raise ConfigError(f"the config could not be applied: {e}.{hint}") from None
    check_config(cfg)
    check_test_datasets(cfg)
    check_output_dir(cfg, args)
    return cfg


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    try:
        cfg = preflight(args)
        if args.eval_only:
            # A fresh folder per evaluation, chosen once here for every process: earlier
            # results and the training run's config.yaml are never overwritten.
            stamp = time.strftime("%Y%m%d-%H%M%S")
            args.opts += ["OUTPUT_DIR", os.path.join(cfg.OUTPUT_DIR, f"eval_{stamp}")]
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except ConfigError as e:
        sys.exit(f"error: {e}")
