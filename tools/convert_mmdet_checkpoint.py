#!/usr/bin/env python
# Copyright (c) fasa_seesaw contributors.
"""
Convert an mmdetection 2.x / 3.x Mask R-CNN or Cascade Mask R-CNN checkpoint (Seesaw or CE
heads, FCN or normed mask heads), or the FASA release's (its feature bank and draw
probabilities included), into a detectron2 checkpoint of this project's model, loadable with
MODEL.WEIGHTS.

    python tools/convert_mmdet_checkpoint.py \\
        mask_rcnn_r50_fpn_random_seesaw_loss_mstrain_2x_lvis_v1-a698dd3d.pth \\
        model_zoo/mmdet_converted/mask_rcnn_R_50_FPN_2x_seesaw_random_mmdet.pth \\
        --config configs/LVISv1-InstanceSegmentation/mmdet_converted/\\
mask_rcnn_R_50_FPN_2x_seesaw_random_mmdet.yaml

Every key of the checkpoint must map onto the model the config builds, and every key of that
model must get a value (training-only state such as FASA's bank may be absent, and is listed);
otherwise the conversion stops and names the keys. The checkpoint's class names (its meta)
must be the config's test dataset's classes in order. OUT is never overwritten.
"""

import argparse
import os
import pickle
import sys
import torch

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from fasa_seesaw import add_fasa_seesaw_config
from fasa_seesaw.config import merge_config
from fasa_seesaw.data import DATASET_ARG_HELP, register_dataset_args
from fasa_seesaw.engine.checkpoint import exclusive_write, is_checkpoint_file, training_state_keys
from fasa_seesaw.engine.settings import check_settings
from fasa_seesaw.errors import ConfigError, is_project_error, user_message
from fasa_seesaw.modelzoo import (
    ConversionError,
    check_class_order,
    checkpoint_classes,
    convert_state_dict,
    lvis_v1_names,
)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("input", metavar="IN.pth", help="the mmdetection checkpoint")
    ap.add_argument("output", metavar="OUT.pth", help="the detectron2 checkpoint to write")
    ap.add_argument("--config", required=True, help="this project's config of the same model")
    ap.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=JSON:IMAGE_ROOT",
        help=DATASET_ARG_HELP,
    )
    ap.add_argument(
        "--skip-class-check",
        action="store_true",
        help="convert a checkpoint whose meta names no classes (the order is then unchecked)",
    )
    ap.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read a checkpoint that torch.load(weights_only=True) refuses; trusted files only",
    )
    ap.add_argument("opts", nargs="*", help="config overrides, KEY VALUE ...")
    return ap.parse_intermixed_args(argv)


def load_checkpoint(path: str, allow_pickle: bool) -> dict:
    if not os.path.isfile(path):
        raise ConversionError(f"the checkpoint {path!r} does not exist.")
    if not is_checkpoint_file(path):
        raise ConversionError(f"{path!r} is not a torch checkpoint (truncated or another format).")
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if not allow_pickle:
                raise ConversionError(
                    f"{path!r} holds Python objects that torch.load(weights_only=True) refuses "
                    f"({str(e).splitlines()[0]}); mmengine's full training checkpoints do. If "
                    "it comes from a trusted source, add --allow-pickle."
                ) from None
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except ConversionError:
        raise
    except Exception as e:  # noqa: B902 (any failure to read the file is one message)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConversionError(
            f"{path!r} could not be read ({first}); it may be truncated."
        ) from None
    if not isinstance(ckpt, dict):
        raise ConversionError(f"{path!r} holds a {type(ckpt).__name__}, not a checkpoint dict.")
    return ckpt


def dataset_classes(cfg):
    """The class names of the config's first test (else training) dataset, in output order
    (for detectron2's LVIS v1 datasets: each category's name and synonyms)."""
    names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
    if not names:
        return None, None
    name = names[0]
    if name.startswith("lvis_v1_"):
        return name, lvis_v1_names()
    meta = MetadataCatalog.get(name)
    if not meta.get("thing_classes") and name in DatasetCatalog.list():
        DatasetCatalog.get(name)  # LVIS-format loaders set thing_classes when they read the json
    return name, meta.get("thing_classes")


def convert(args) -> int:
    if os.path.lexists(args.output):
        raise ConfigError(
            f"{args.output!r} exists; it is never overwritten. Remove it or choose another name."
        )
    if not os.path.isfile(args.config):
        raise ConfigError(f"the config {args.config!r} (--config) does not exist.")
    register_dataset_args(args.dataset)
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    try:
        merge_config(cfg, args.config, args.opts)
    except (ValueError, KeyError, AssertionError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(
            f"the config could not be applied: {e}. Overrides are KEY VALUE pairs."
        ) from None
    check_settings(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()

    ckpt = load_checkpoint(args.input, args.allow_pickle)
    state = ckpt.get("state_dict", ckpt)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{args.input!r} has no state_dict of tensors.")

    classes = checkpoint_classes(ckpt)
    if classes is None and not args.skip_class_check:
        raise ConversionError(
            f"{args.input!r} names no classes in its meta, so their order cannot be checked; "
            "pass --skip-class-check if you know it matches the dataset's."
        )
    if classes is not None:
        name, expected = dataset_classes(cfg)
        if expected is None:
            raise ConversionError(
                "the config names no dataset with class names (DATASETS.TEST) to check the "
                "checkpoint's classes against; register one with --dataset, or pass "
                "--skip-class-check."
            )
        check_class_order(classes, expected)
        print(f"classes: {len(classes)}, in the order of {name}")

    model = build_model(cfg)
    model_state = model.state_dict()
    out, notes = convert_state_dict(state, model_state, optional=training_state_keys(model))
    model.load_state_dict(out, strict=True)
    payload = {
        "model": out,
        "__author__": "fasa_seesaw tools/convert_mmdet_checkpoint.py",
        "source": os.path.basename(args.input),
        "config": os.path.basename(args.config),
    }
    try:
        exclusive_write(args.output, lambda f: torch.save(payload, f))
    except FileExistsError:
        raise ConfigError(
            f"{args.output!r} appeared while converting; it is never overwritten. Remove it or "
            "choose another name."
        ) from None
    print(f"converted {len(state)} checkpoint tensors into {len(out)} model tensors")
    for note in notes:
        print(f"  {note}")
    print(f"wrote {args.output}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return convert(args)
    except Exception as e:  # noqa: B902 (a project error is one message)
        if not is_project_error(e):
            raise
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
