#!/usr/bin/env python
# Copyright (c) fasa_seesaw contributors.
"""
Train and evaluate Mask R-CNN / Cascade Mask R-CNN with Seesaw Loss and FASA on LVIS-format data.

    python train_net.py --config-file configs/quickstart/mask_rcnn_R_18_FPN_seesaw_quickstart.yaml
    python train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS W TEST.AUG.ENABLED True
    python train_net.py --config-file CONFIG --num-gpus 8 --resume
    python train_net.py --config-file CONFIG --dataset my_train=train.json:images \\
        --dataset my_val=val.json:images DATASETS.TRAIN "('my_train',)" DATASETS.TEST "('my_val',)"
"""

import os
import sys
import time

import detectron2.utils.comm as comm
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils.logger import setup_logger

from fasa_seesaw import ConfigError, add_fasa_seesaw_config
from fasa_seesaw.config import merge_config
from fasa_seesaw.data import DATASET_ARG_HELP, register_dataset_args
from fasa_seesaw.data.check import check_data
from fasa_seesaw.engine import Trainer, check_config, check_datasets, check_output_dir
from fasa_seesaw.engine.checkpoint import check_resume_files, check_weights_file, load_for_eval
from fasa_seesaw.engine.fasa_hook import configure_fasa_heldout
from fasa_seesaw.engine.settings import check_settings
from fasa_seesaw.errors import is_project_error, user_message
from fasa_seesaw.evaluation.report import print_summary


def setup(args):
    register_dataset_args(args.dataset)
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    merge_config(cfg, args.config_file, args.opts)
    check_settings(cfg)  # before the held-out carve reads its fraction and seed
    configure_fasa_heldout(cfg)
    cfg.freeze()
    return cfg


def main(args):
    cfg = setup(args)
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="fasa_seesaw")
    check_config(cfg)

    if args.eval_only:
        model = Trainer.build_model(cfg)
        load_for_eval(model, cfg.MODEL.WEIGHTS, allow_untrained=args.eval_untrained)
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
            print_summary(res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    res = trainer.last_eval_results
    if cfg.TEST.AUG.ENABLED:
        res = {**(res or {}), **Trainer.test_with_TTA(cfg, trainer.model)}
    if comm.is_main_process():
        print_summary(res)
    return res


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
    if args.eval_only:
        check_datasets(cfg, train=False)
        return cfg
    check_datasets(cfg)
    if not args.check_data:
        check_output_dir(cfg, resume=args.resume)
        if args.resume:
            check_resume_files(cfg.OUTPUT_DIR, clean=False)
    return cfg


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=JSON:IMAGE_ROOT",
        help=DATASET_ARG_HELP,
    )
    parser.add_argument(
        "--check-data",
        action="store_true",
        help="open and decode every image of DATASETS.TRAIN and DATASETS.TEST, report, and exit",
    )
    parser.add_argument(
        "--eval-untrained",
        action="store_true",
        help="with --eval-only and an empty MODEL.WEIGHTS: evaluate the untrained model",
    )
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    try:
        cfg = preflight(args)
        if args.check_data:
            sys.exit(check_data(cfg))
        if args.eval_only:
            last = check_resume_files(cfg.OUTPUT_DIR, clean=False) if args.resume else None
            if last:  # --resume: the checkpoint the training folder's last_checkpoint names
                print(f"--eval-only --resume: evaluating {last} (OUTPUT_DIR/last_checkpoint)")
                args.opts += ["MODEL.WEIGHTS", last]
            check_weights_file(last or cfg.MODEL.WEIGHTS, allow_untrained=args.eval_untrained)
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
    except Exception as e:  # noqa: B902 (a project error from any process is one message)
        if not is_project_error(e):
            raise
        sys.exit(f"error: {user_message(e)}")
