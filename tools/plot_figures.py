#!/usr/bin/env python
# Copyright (c) fasa_seesaw contributors.
"""
FASA's diagnostic figures from trained checkpoints.

t-SNE of the FASA class feature means, coloured by adaptation group (FASA supplement, Figure 1):

    python tools/plot_figures.py tsne \
        --config-file configs/quickstart/mask_rcnn_R_18_FPN_fasa_seesaw_quickstart.yaml \
        --weights output/quickstart_fasa_seesaw/model_final.pth --out tsne.png [--stage -1]

Two models' predictions on the same rare-class images (FASA supplement, Figure 2):

    python tools/plot_figures.py side-by-side \
        --config-file configs/quickstart/mask_rcnn_R_18_FPN_seesaw_quickstart.yaml \
        --weights output/quickstart_seesaw/model_final.pth --name Seesaw \
        --config-file2 configs/quickstart/mask_rcnn_R_18_FPN_fasa_seesaw_quickstart.yaml \
        --weights2 output/quickstart_fasa_seesaw/model_final.pth --name2 "FASA + Seesaw" \
        --out-dir figures/ [--dataset longtail_synth_quickstart_val] [--num-images 4]

Config options (KEY VALUE pairs, e.g. MODEL.DEVICE cuda) may follow the arguments; for
side-by-side they apply to both models. Existing files are never overwritten: ".1", ".2", ...
is added before the extension instead.
"""

import argparse
import numpy as np
import os
import re
import sys
from typing import Dict, List, Optional, Sequence
import torch

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from fasa_seesaw import ConfigError, add_fasa_seesaw_config  # also registers the datasets
from fasa_seesaw.config import merge_config
from fasa_seesaw.data import register_dataset_args
from fasa_seesaw.data.heldout import base_dataset
from fasa_seesaw.evaluation.category_table import category_table
from fasa_seesaw.evaluation.figures import FREQUENCY_NAMES
from fasa_seesaw.evaluation.report import unique_path

HOOK_NAME = "FASAAdaptationHook"  # the key detectron2's TrainerBase.state_dict gives its state
# A box predictor's FASA state in a model state dict, after the predictor's prefix: the FASA
# module's (bank, draw probabilities), or, in checkpoints from before FASA became a module, the
# predictor's own buffers.
_FASA_LAYOUTS = (("fasa.bank.", "fasa.probs"), ("fasa_bank.", "fasa_probs"))
_BANK_MEAN = re.compile(r"^(.*)(fasa\.bank\.|fasa_bank\.)mean$")
_FREQUENCY_GROUP = {"f": 0, "c": 1, "r": 2}
# Splits train_net.py carves for FASA (fasa_seesaw.data.heldout); a saved config.yaml names them.
_SPLIT_SUFFIXES = ("_fasa_fit", "_fasa_heldout")

DATASET_HELP = "register an LVIS-format dataset, as train_net.py --dataset does (repeatable)"


class ToolError(Exception):
    """A problem with the user's input; main() prints it as one line and exits."""


def build_cfg(config_file: str, opts: Sequence[str] = (), weights: Optional[str] = None):
    """The config as train_net.py builds it (without carving FASA's held-out split), frozen."""
    if not os.path.isfile(config_file):
        raise ToolError(f"config file {config_file} does not exist")
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    try:
        merge_config(cfg, config_file, list(opts))  # a renamed key: an error naming the new one
    except ConfigError as e:
        raise ToolError(str(e)) from None
    if weights is not None:
        cfg.MODEL.WEIGHTS = weights
    cfg.freeze()
    return cfg


def metadata_dataset(name: str) -> str:
    """
    The registered dataset whose metadata describes ``name``: the dataset a FASA split was carved
    from (also when the split itself is not registered in this process, as when the config is an
    OUTPUT_DIR/config.yaml), else ``name``.
    """
    name = base_dataset(name)
    if name not in MetadataCatalog.list():
        for suffix in _SPLIT_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] in MetadataCatalog.list():
                return name[: -len(suffix)]
    return name


def category_info(cfg) -> Dict[str, list]:
    """Names and r/c/f frequency per contiguous class id, from cfg.DATASETS.TRAIN[0]'s metadata."""
    if not cfg.DATASETS.TRAIN:
        raise ToolError("the config has no DATASETS.TRAIN to read class frequencies from")
    name = metadata_dataset(cfg.DATASETS.TRAIN[0])
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    meta = MetadataCatalog.get(name)
    names = list(meta.get("thing_classes", None) or [])
    frequency = meta.get("thing_frequency", None)
    if len(names) == num_classes and frequency is not None and len(frequency) == num_classes:
        return {"name": names, "frequency": [str(f) for f in frequency]}
    # class_image_count and the LVIS thresholds, or the training images counted.
    table = category_table(name, num_classes)
    return {"name": table["name"], "frequency": table["frequency"]}


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def load_fasa_bank(path: str, stage: int = -1) -> Dict[str, object]:
    """
    The FASA feature bank of one predictor and the classes' adaptation groups, from a
    DetectionCheckpointer checkpoint ({"model": state dict, "trainer": {"iteration", "hooks":
    {hook qualname: state}}, ...}) or a bare model state dict. Both state-dict layouts are read:
    ``<predictor>.fasa.bank.*`` and ``<predictor>.fasa.probs`` (the FASA module), and the
    ``<predictor>.fasa_bank.*`` and ``<predictor>.fasa_probs`` of older checkpoints.

    Args:
        stage: which FASA predictor, as a Python index over those in the checkpoint in stage
            order (a cascade has one per stage: -1 is the last; other models have one).

    Returns:
        dict with mean, var (C, D) float64, count (C,) int64, seen (C,) bool, probs (C,) float64
        or None, groups (C,) int64
        or None when the checkpoint holds no adaptation pass, passes (int), iteration (int or
        None), stage (the resolved index), num_stages and prefix (the predictor's state-dict
        prefix).
    """
    if not os.path.isfile(path):
        raise ToolError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # older checkpoints of this project hold numpy arrays in the hook state
        print(
            f"note: {path} needs weights_only=False (numpy in its trainer state)", file=sys.stderr
        )
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict):
        raise ToolError(f"{path} is not a detectron2 checkpoint (a dict); got {type(ckpt)}")
    is_checkpoint = isinstance(ckpt.get("model", None), dict)
    model = ckpt["model"] if is_checkpoint else ckpt
    matches = (_BANK_MEAN.match(key) for key in model if isinstance(key, str))
    layouts = dict(_FASA_LAYOUTS)
    found = {m.group(1): m.group(2) for m in matches if m is not None}
    prefixes = sorted(found, key=_natural_key)
    if not prefixes:
        raise ToolError(
            f"{path} has no FASA feature bank (no '...fasa.bank.mean' in its model state); "
            "train with MODEL.FASA.ENABLED True"
        )
    n = len(prefixes)
    if not -n <= stage < n:
        raise ToolError(
            f"--stage {stage} is out of range: {path} has {n} FASA predictor(s) "
            f"(stages 0..{n - 1}, or -1 for the last)"
        )
    k = stage % n
    prefix = prefixes[k]
    bank = prefix + found[prefix]
    probs = prefix + layouts[found[prefix]]
    missing = [b for b in ("mean", "var", "count") if bank + b not in model]
    if missing:
        raise ToolError(f"{path}: the FASA bank at '{bank}' lacks {missing}")
    count = _numpy(model[bank + "count"]).astype(np.int64)
    out = {
        "mean": _numpy(model[bank + "mean"]).astype(np.float64),
        "var": _numpy(model[bank + "var"]).astype(np.float64),
        "count": count,
        "seen": count > 0,  # ClassFeatureBank.seen
        # The draw probabilities (FASA.probs), when present.
        "probs": _numpy(model[probs]).astype(np.float64) if probs in model else None,
        "groups": None,
        "passes": 0,
        "stage": k,
        "num_stages": n,
        "prefix": prefix,
    }
    # DetectionCheckpointer stores the trainer's state_dict() under "trainer".
    trainer = ckpt.get("trainer", None) if is_checkpoint else None
    trainer = trainer if isinstance(trainer, dict) else {}
    iteration = trainer.get("iteration", ckpt.get("iteration", None) if is_checkpoint else None)
    out["iteration"] = None if iteration is None else int(iteration)
    hook = _hook_state(trainer.get("hooks", None) or {})
    if hook is not None:
        out["passes"] = int(hook.get("passes", 0) or 0)
        groups = hook.get("groups", None)
        if groups is not None:
            if len(groups) != n:
                raise ToolError(
                    f"{path}: the {HOOK_NAME} state holds groups of {len(groups)} predictor(s) "
                    f"but the model has {n} FASA bank(s)"
                )
            g = _numpy(groups[k]).astype(np.int64).reshape(-1)
            if g.shape != count.shape:
                raise ToolError(
                    f"{path}: {len(g)} adaptation groups for {len(count)} classes in '{bank}'"
                )
            out["groups"] = g
    return out


def _hook_state(hooks: dict) -> Optional[dict]:
    if HOOK_NAME in hooks:
        return hooks[HOOK_NAME]
    for state in hooks.values():  # a subclass: another qualname, the same state
        if isinstance(state, dict) and "groups" in state and "passes" in state:
            return state
    return None


def frequency_groups(frequency: Sequence[str]) -> np.ndarray:
    """Group ids from r/c/f labels: f 0, c 1, r 2, anything else 3."""
    return np.asarray([_FREQUENCY_GROUP.get(str(f), 3) for f in frequency], dtype=np.int64)


def cmd_tsne(args) -> str:
    state = load_fasa_bank(args.weights, args.stage)
    cfg = build_cfg(args.config_file, args.opts)
    if not cfg.MODEL.FASA.ENABLED:
        print(f"warning: {args.config_file} has MODEL.FASA.ENABLED False", file=sys.stderr)
    C = state["mean"].shape[0]
    if C != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise ToolError(
            f"{args.weights} has a FASA bank of {C} classes but the config has "
            f"MODEL.ROI_HEADS.NUM_CLASSES {cfg.MODEL.ROI_HEADS.NUM_CLASSES}; give the config the "
            "checkpoint was trained with"
        )
    info = category_info(cfg)
    groups = state["groups"]
    where = f"stage {state['stage']}, " if state["num_stages"] > 1 else ""
    it = state["iteration"]
    # detectron2 saves after the step of iteration ``it`` (0-based): it + 1 steps are done.
    where += f"after {it + 1} iterations" if it is not None else "iterations unknown"
    if groups is None:
        print(
            f"note: {args.weights} holds no FASA adaptation pass ({HOOK_NAME} groups absent); "
            "colouring by frequency group instead",
            file=sys.stderr,
        )
        groups = frequency_groups(info["frequency"])
        note = f"no adaptation pass yet: coloured by frequency group ({where})"
    else:
        note = f"groups of FASA adaptation pass {state['passes']} ({where})"
    import figures_extra  # next to this script (tools/ is not a package)

    fig = figures_extra.fasa_tsne_figure(
        state["mean"],
        state["seen"],
        groups,
        frequency=info["frequency"],
        seed=args.seed,
        class_names=info["name"],
    )
    ax = fig.axes[0]
    ax.set_title(f"{ax.get_title()}\n{note}", fontsize=10)
    legend = ax.get_legend()
    if state["groups"] is None and legend is not None:
        names = {f"group {g}": FREQUENCY_NAMES[f] for f, g in _FREQUENCY_GROUP.items()}
        for text in legend.get_texts():
            text.set_text(names.get(text.get_text(), text.get_text()))
    fig.tight_layout()
    out = unique_path(args.out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, format="png", dpi=fig.dpi)
    print(out)
    return out


def rare_instance_counts(dataset_dicts: Sequence[dict], frequency: Sequence[str]) -> List[int]:
    """Per image, its instances of rare ("r") categories (contiguous category ids)."""
    rare = {i for i, f in enumerate(frequency) if f == "r"}
    return [
        sum(1 for a in d.get("annotations", ()) if a.get("category_id") in rare)
        for d in dataset_dicts
    ]


def choose_rare_images(
    dataset_dicts: Sequence[dict], frequency: Sequence[str], num_images: int
) -> List[dict]:
    """
    The ``num_images`` images with the most instances of rare categories, among those with at
    least one; ties go to more distinct rare categories, then to the smaller image id, so the
    choice does not depend on the dataset's order.
    """
    rare = {i for i, f in enumerate(frequency) if f == "r"}
    ranked = []
    for d, n in zip(dataset_dicts, rare_instance_counts(dataset_dicts, frequency)):
        if n > 0:
            kinds = {a["category_id"] for a in d["annotations"] if a.get("category_id") in rare}
            image_id = str(d["image_id"])
            ranked.append(((-n, -len(kinds), _natural_key(image_id), image_id), d))
    ranked.sort(key=lambda t: t[0])
    return [d for _, d in ranked[: max(num_images, 0)]]


def select_images(dataset_dicts: Sequence[dict], image_ids: Sequence[str]) -> List[dict]:
    """The dataset dicts of the given image ids (compared as strings), in the given order."""
    by_id = {str(d["image_id"]): d for d in dataset_dicts}
    unknown = [i for i in image_ids if str(i) not in by_id]
    if unknown:
        raise ToolError(f"image ids {unknown} are not in the dataset")
    return [by_id[str(i)] for i in image_ids]


def load_weights(model, path: str) -> None:
    """
    The trained weights, refused (with the shapes that differ) when they do not fit the model
    the config builds. Checkpoints of this project written before the FASA hook stored tensors
    hold numpy arrays in their trainer state, which torch.load's weights_only default refuses:
    those (our own files) are read with weights_only=False.
    """
    from fasa_seesaw.engine.checkpoint import load_for_eval

    load_for_eval(model, path, allow_pickle=True)


def _predictor(cfg):
    """detectron2's DefaultPredictor (build_model, eval, test-time resize, INPUT.FORMAT)."""
    from detectron2.engine import DefaultPredictor

    weights = cfg.MODEL.WEIGHTS
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""  # loaded below
    predictor = DefaultPredictor(cfg)
    load_weights(predictor.model, weights)
    return predictor


def _as_plot_predictions(outputs) -> dict:
    inst = outputs["instances"].to("cpu")
    preds = {
        "boxes": inst.pred_boxes.tensor,
        "scores": inst.scores,
        "classes": inst.pred_classes,
    }
    if inst.has("pred_masks"):
        preds["masks"] = inst.pred_masks
    return preds


def cmd_side_by_side(args) -> List[str]:
    from detectron2.data.detection_utils import read_image

    import figures_extra  # next to this script (tools/ is not a package)

    for w in (args.weights, args.weights2):
        if not os.path.isfile(w):
            raise ToolError(f"checkpoint {w} does not exist")
    cfg_a = build_cfg(args.config_file, args.opts, weights=args.weights)
    cfg_b = build_cfg(args.config_file2, args.opts, weights=args.weights2)
    C = cfg_a.MODEL.ROI_HEADS.NUM_CLASSES
    if cfg_b.MODEL.ROI_HEADS.NUM_CLASSES != C:
        raise ToolError(
            f"the models have {C} and {cfg_b.MODEL.ROI_HEADS.NUM_CLASSES} classes; compare "
            "models trained on the same categories"
        )
    chosen_name = args.dataset[-1].partition("=")[0] if args.dataset else None
    dataset = chosen_name or (cfg_a.DATASETS.TEST[0] if cfg_a.DATASETS.TEST else None)
    if not dataset:
        raise ToolError("no --dataset given and the first config has no DATASETS.TEST")
    if dataset not in DatasetCatalog.list():
        raise ToolError(f"dataset '{dataset}' is not registered")
    info = category_info(cfg_a)
    class_names = list(MetadataCatalog.get(dataset).get("thing_classes", None) or info["name"])
    dicts = DatasetCatalog.get(dataset)
    if args.image_ids:
        chosen = select_images(dicts, args.image_ids)
    else:
        chosen = choose_rare_images(dicts, info["frequency"], args.num_images)
        if not chosen:
            raise ToolError(
                f"no image of '{dataset}' has an instance of a rare category; choose images with "
                "--image-ids"
            )
    names = [
        n or os.path.basename(os.path.dirname(os.path.abspath(w))) or w
        for n, w in ((args.name, args.weights), (args.name2, args.weights2))
    ]
    predictors = [_predictor(cfg_a), _predictor(cfg_b)]
    rare = rare_instance_counts(chosen, info["frequency"])
    written = []
    for d, n_rare in zip(chosen, rare):
        bgr = read_image(d["file_name"], format="BGR")  # DefaultPredictor converts to INPUT.FORMAT
        with torch.no_grad():
            preds = [_as_plot_predictions(p(bgr)) for p in predictors]
        out = unique_path(os.path.join(args.out_dir, f"side_by_side_{d['image_id']}.png"))
        figures_extra.plot_side_by_side(
            np.ascontiguousarray(bgr[:, :, ::-1]),
            preds[0],
            preds[1],
            names,
            out,
            class_names,
            score_thresh=args.score_thresh,
        )
        print(f"{out}  (image {d['image_id']}, {n_rare} rare instance(s))")
        written.append(out)
    return written


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.strip().splitlines()[1:]),
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tsne", help="t-SNE of FASA class feature means, coloured by group")
    p.add_argument(
        "--config-file", required=True, help="the config the checkpoint was trained with"
    )
    p.add_argument("--weights", required=True, help="a checkpoint, e.g. OUTPUT/model_final.pth")
    p.add_argument("--out", default="fasa_tsne.png", help="the PNG to write")
    p.add_argument("--stage", type=int, default=-1, help="cascade stage (default: the last)")
    p.add_argument("--seed", type=int, default=0, help="t-SNE random state")
    p.add_argument(
        "--dataset", action="append", default=[], metavar="NAME=JSON:IMAGE_ROOT", help=DATASET_HELP
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config options: KEY VALUE ...")
    p.set_defaults(func=cmd_tsne)

    p = sub.add_parser("side-by-side", help="two models' predictions on rare-class images")
    p.add_argument("--config-file", required=True, help="model A's config")
    p.add_argument("--weights", required=True, help="model A's checkpoint")
    p.add_argument("--name", default="", help="model A's title (default: its folder name)")
    p.add_argument("--config-file2", required=True, help="model B's config")
    p.add_argument("--weights2", required=True, help="model B's checkpoint")
    p.add_argument("--name2", default="", help="model B's title (default: its folder name)")
    p.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME[=JSON:IMAGE_ROOT]",
        help=DATASET_HELP + "; the last one given is drawn from (default: DATASETS.TEST[0] of "
        "model A's config)",
    )
    p.add_argument("--out-dir", required=True, help="side_by_side_<image_id>.png go here")
    p.add_argument(
        "--num-images", type=int, default=4, help="images with the most rare-class instances"
    )
    p.add_argument("--image-ids", nargs="+", help="these images instead of the rare-class choice")
    p.add_argument("--score-thresh", type=float, default=0.3, help="detections drawn from here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config options for both: KEY VALUE ...")
    p.set_defaults(func=cmd_side_by_side)
    args = parser.parse_args(argv)
    try:  # as train_net.py --dataset: LVIS-format datasets registered before configs are read
        # side-by-side also takes a registered dataset's bare NAME (the one to draw from)
        register_dataset_args([d for d in args.dataset if "=" in d or args.command == "tsne"])
    except ConfigError as e:
        parser.error(str(e))
    if getattr(args, "num_images", 1) < 1:
        parser.error(f"--num-images must be at least 1; got {args.num_images}")
    if len(args.opts) % 2:
        parser.error(f"config options come in KEY VALUE pairs; got {args.opts}")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        return args.func(args)
    except (ToolError, ConfigError) as e:  # ConfigError: e.g. weights that do not fit the config
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
