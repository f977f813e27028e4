# Copyright (c) fasa_seesaw contributors.
"""
What the FASA benchmarks (bench_fasa_step.py, bench_fasa_generation.py and the bench_fasa.py that
runs both) share: the data root, FASA's LVIS v1 statistics, the LVIS v1 Mask R-CNN variants and
their synthetic training batches, and the command line that runs a benchmark's parts.

Import it before detectron2 and fasa_seesaw: it points DETECTRON2_DATASETS at <repo>/datasets
unless FASA_SEESAW_DATA or DETECTRON2_DATASETS is set.
"""

import argparse
import collections
import os
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The built-in synthetic data lives under <repo>/datasets unless told otherwise (the package
# resolves its data root at import, relative to the working directory).
if not os.environ.get("FASA_SEESAW_DATA") and not os.environ.get("DETECTRON2_DATASETS"):
    os.environ["DETECTRON2_DATASETS"] = str(REPO / "datasets")
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.solver import build_optimizer  # noqa: E402
from detectron2.structures import Boxes, Instances, PolygonMasks  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import fasa_seesaw  # noqa: E402,F401  (registers ROI heads and datasets)
from common import (  # noqa: E402
    add_device_args,
    add_quiet_args,
    device_name,
    init_device,
    lvis_image_counts,
    run_config,
    time_interleaved,
    wait_until_quiet,
    write_json,
)
from fasa_seesaw import add_fasa_seesaw_config  # noqa: E402
from fasa_seesaw.modeling.fasa_sampling import initial_probabilities  # noqa: E402

LVIS_DIR = REPO / "configs" / "LVISv1-InstanceSegmentation"

# name -> (config file, extra options)
VARIANTS = {
    "CE": ("mask_rcnn_R_50_FPN_2x_ce_random_lvis_v1.yaml", []),
    "Seesaw": ("mask_rcnn_R_50_FPN_2x_seesaw_random_lvis_v1.yaml", []),
    "CE+FASA": ("mask_rcnn_R_50_FPN_2x_fasa_random_lvis_v1.yaml", []),
    "Seesaw+FASA": ("mask_rcnn_R_50_FPN_2x_fasa_seesaw_random_lvis_v1.yaml", []),
}
PAIRS = [("CE", "CE+FASA"), ("Seesaw", "Seesaw+FASA")]
# The toolkit's training-time options (bench_toolkit_step.py), each timed against "CE".
TOOLKIT_VARIANTS = {
    "CE": VARIANTS["CE"],
    "NR": ("mask_rcnn_R_50_FPN_2x_nr_random_lvis_v1.yaml", []),
    "NR matched": (
        "mask_rcnn_R_50_FPN_2x_nr_random_lvis_v1.yaml",
        ["MODEL.RPN.NMS_RESAMPLING.MODE", "matched"],
    ),
    "EQL": ("mask_rcnn_R_50_FPN_2x_eql_random_lvis_v1.yaml", []),
    "EQLv2": ("mask_rcnn_R_50_FPN_2x_eqlv2_random_lvis_v1.yaml", []),
    "Seesaw": VARIANTS["Seesaw"],
    "Seesaw dual-head stage": ("mask_rcnn_R_50_FPN_1x_seesaw_dual_head_rfs_lvis_v1.yaml", []),
    "CE+FASA": VARIANTS["CE+FASA"],
    "CE+FASA SMOTE": ("mask_rcnn_R_50_FPN_2x_fasa_smote_random_lvis_v1.yaml", []),
    "CE+FASA MoEx": ("mask_rcnn_R_50_FPN_2x_fasa_moex_random_lvis_v1.yaml", []),
}
# LVIS v1 train images with annotations, the denominator of EQL's frequencies (the official LVIS
# v1 frequency table's values times this give its image counts, e.g. 64 / 0.000643941).
LVIS_V1_ANNOTATED_TRAIN_IMAGES = 99_388


# --------------------------------------------------------------------------------------------
# LVIS class statistics
# --------------------------------------------------------------------------------------------
def lvis_fasa_probs():
    """FASA's initial p_c from LVIS v1 image counts (inverse frequency, normalised)."""
    return initial_probabilities(lvis_image_counts(), "inverse_frequency")


def fill_bank(bank, counts, seed=0):
    """A realistic post-warm-up bank: every class seen, ReLU-like means, positive variances."""
    g = torch.Generator().manual_seed(seed)
    C, D = bank.mean.shape
    mean = torch.randn(C, D, generator=g).abs() * 0.3
    std = torch.rand(C, D, generator=g) * 0.3 + 0.05
    with torch.no_grad():
        bank.mean.copy_(mean.to(bank.mean))
        bank.var.copy_((std * std).to(bank.var))
        bank.count.copy_(torch.as_tensor(np.maximum(counts, 1), dtype=torch.long))


def fill_store(store, seed=0):
    """A full feature store: ReLU-like features in every slot of every class."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        feats = torch.randn(store.features.shape, generator=g).abs() * 0.3
        store.features.copy_(feats.to(store.features))
        store.count.fill_(store.memory)


# --------------------------------------------------------------------------------------------
# the LVIS v1 models and their synthetic training batches
# --------------------------------------------------------------------------------------------
def image_hw(size):
    """Short side `size`, 4:3 (LVIS / COCO images are mostly 640x480), long side <= 1333."""
    return size, min(int(round(size * 4 / 3)), 1333)


def _random_boxes(rng, n, H, W):
    """n boxes, log-uniform sides from 8 px to 60% of the short side, aspect 1:2 .. 2:1."""
    side = np.exp(rng.uniform(np.log(8), np.log(0.6 * min(H, W)), n))
    ar = np.exp(rng.uniform(np.log(0.5), np.log(2.0), n))
    bw, bh = np.minimum(side * np.sqrt(ar), W - 2), np.minimum(side / np.sqrt(ar), H - 2)
    x0 = rng.uniform(0, W - bw - 1)
    y0 = rng.uniform(0, H - bh - 1)
    return np.stack([x0, y0, x0 + bw, y0 + bh], axis=1)


def _iou(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def make_batch(args, device, num_proposals):
    """
    Synthetic training inputs: uint8 BGR images, GT instances with polygon masks, and the
    proposals that replace the RPN's (see inject_proposals): fg_per_image - n jittered copies of
    the GT boxes (IoU >= 0.6 with their GT) and background boxes (IoU < 0.5 with every GT), in
    all num_proposals per image.
    """
    rng = np.random.default_rng(args.seed)
    counts = lvis_image_counts()
    p_lbl = counts / counts.sum()
    H, W = image_hw(args.image_size)
    gen = torch.Generator().manual_seed(args.seed)
    batch = []
    for _ in range(args.batch):
        img = torch.randint(0, 256, (3, H, W), generator=gen, dtype=torch.uint8)
        n = args.gt_per_image
        boxes = _random_boxes(rng, n, H, W)
        polys = []
        for a, b, c, d in boxes:
            # a 16-gon with jittered radius inscribed in the box
            t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
            r = rng.uniform(0.7, 1.0, 16)
            cx, cy, rx, ry = (a + c) / 2, (b + d) / 2, (c - a) / 2, (d - b) / 2
            xy = np.stack([cx + rx * r * np.cos(t), cy + ry * r * np.sin(t)], axis=1)
            polys.append([xy.reshape(-1)])
        inst = Instances((H, W))
        inst.gt_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32))
        inst.gt_classes = torch.as_tensor(
            rng.choice(len(counts), size=n, p=p_lbl), dtype=torch.long
        )
        inst.gt_masks = PolygonMasks(polys)
        # foreground proposals: each coordinate of a GT box moved by <= 8% of its side
        n_fg = min(max(args.fg_per_image - n, 0), num_proposals)
        src = boxes[np.arange(n_fg) % n]
        wh = np.concatenate([src[:, 2:] - src[:, :2]] * 2, axis=1)
        fg = src + rng.uniform(-0.08, 0.08, src.shape) * wh
        # background proposals: random boxes overlapping no GT box by IoU >= 0.5
        bg = np.zeros((0, 4))
        while len(bg) < num_proposals - n_fg:
            cand = _random_boxes(rng, 2 * num_proposals, H, W)
            bg = np.concatenate([bg, cand[_iou(cand, boxes).max(axis=1) < 0.5]])
        props = np.concatenate([fg, bg[: num_proposals - n_fg]])
        props[:, 0::2] = props[:, 0::2].clip(0, W)
        props[:, 1::2] = props[:, 1::2].clip(0, H)
        batch.append(
            {
                "image": img.to(device),
                "instances": inst.to(device),
                "height": H,
                "width": W,
                "proposals_override": torch.as_tensor(props, dtype=torch.float32, device=device),
            }
        )
    return batch


def inject_proposals(model, batch, at_test=False):
    """
    The RPN still runs (forward, losses, NMS), but the ROI heads get the batch's synthetic
    proposals instead of its output. A random-init R50 (no ImageNet weights, FrozenBN) blows its
    activations up and its RPN keeps only a handful of boxes after NMS, so the ROI heads would
    otherwise see a few dozen RoIs per image instead of 512, and only the GT boxes as
    foreground. With this, every image has POST_NMS_TOPK_TRAIN proposals, --fg-per-image of
    them foreground (GT boxes included), as a trained RPN would give. With ``at_test`` the
    box heads get them at inference too (batch: the images in the order the model sees them).
    """
    rpn = model.proposal_generator
    orig = rpn.forward
    boxes = [d["proposals_override"] for d in batch]

    def forward(images, features, gt_instances=None):
        proposals, losses = orig(images, features, gt_instances)
        if rpn.training or at_test:
            out = []
            for p, b in zip(proposals, boxes):
                q = Instances(p.image_size)
                q.proposal_boxes = Boxes(b)
                q.objectness_logits = torch.zeros(len(b), device=b.device)
                out.append(q)
            proposals = out
        return proposals, losses

    rpn.forward = forward


def num_proposals(args):
    return variant_cfg("CE", args).MODEL.RPN.POST_NMS_TOPK_TRAIN


def variant_cfg(name, args):
    cfg_file, extra = {**VARIANTS, **TOOLKIT_VARIANTS}[name]
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    cfg.merge_from_file(str(LVIS_DIR / cfg_file))
    opts = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device, "SOLVER.BASE_LR", args.lr] + extra
    if cfg.MODEL.FASA.ENABLED:
        opts += ["MODEL.FASA.WARMUP_ITERS", 0]
    cfg.merge_from_list(opts)
    cfg.freeze()
    return cfg


def build_variant(name, args, device):
    """Model (train mode) + detectron2's SGD optimizer; FASA predictors set up past warm-up."""
    cfg = variant_cfg(name, args)
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    model.train()
    pred = model.roi_heads.box_predictor
    if pred.fasa is not None:
        counts = lvis_image_counts()
        with torch.no_grad():
            pred.fasa.probs.copy_(torch.as_tensor(lvis_fasa_probs(), dtype=pred.fasa.probs.dtype))
            pred.fasa.probs_initialized.fill_(True)
        fill_bank(pred.fasa.bank, counts, seed=args.seed)
        if pred.fasa.store is not None:  # SMOTE / MoEx: every slot of every class filled
            fill_store(pred.fasa.store, seed=args.seed)
    class_counts = getattr(pred.cls_loss, "class_counts", None)
    if class_counts is not None:  # Seesaw: counts of a run in progress, not all zero
        rng = np.random.default_rng(args.seed)
        c = lvis_image_counts()
        with torch.no_grad():
            class_counts.copy_(torch.as_tensor(rng.multinomial(512_000, c / c.sum())))
    _set_toolkit_state(model, cfg)
    optimizer = build_optimizer(cfg, model)
    return cfg, model, optimizer


def _set_toolkit_state(model, cfg):
    """What the toolkit's options read from the training set on their first step, set from LVIS
    v1's statistics so no dataset is loaded; the dual-head stage frozen as its trainer does."""
    from fasa_seesaw.data.counts import lvis_frequency
    from fasa_seesaw.modeling.dual_head import freeze_for_dual_head
    from fasa_seesaw.modeling.nms_resampling import class_groups_from_frequency

    counts = lvis_image_counts()
    rpn = model.proposal_generator
    if getattr(rpn, "nms_resampling", False):
        rpn.class_groups = class_groups_from_frequency(lvis_frequency(counts).tolist())
    loss = model.roi_heads.box_predictor.cls_loss
    if hasattr(loss, "frequency_initialized"):  # EQL
        with torch.no_grad():
            loss.frequency.copy_(torch.as_tensor(counts / LVIS_V1_ANNOTATED_TRAIN_IMAGES))
            loss.frequency_initialized.fill_(True)
    if cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED:
        freeze_for_dual_head(model)


def build_variant_for(name, args, device, batch):
    cfg, model, optimizer = build_variant(name, args, device)
    inject_proposals(model, batch)
    return cfg, model, optimizer


def make_step(model, optimizer, batch, log):
    def step():
        loss_dict = model(batch)
        losses = sum(loss_dict.values())
        optimizer.zero_grad()
        losses.backward()
        optimizer.step()
        if log is not None:
            log.append({k: float(v.detach()) for k, v in loss_dict.items()})
        return loss_dict

    return step


def time_variant_steps(args, device, names, batch):
    """
    Build each variant and its training step on ``batch``, wait for a quiet machine, then time
    the steps interleaved (torch seeded per repetition, busy repetitions repeated). Returns
    (models, logs, times, info, storage): per-variant models, loss logs and step times (ms),
    time_interleaved's info, and the EventStorage the steps logged to.
    """
    models, steps, logs = {}, {}, {}
    for name in names:
        _, model, opt = build_variant_for(name, args, device, batch)
        models[name] = model
        logs[name] = []
        steps[name] = make_step(model, opt, batch, logs[name])
    info = {"background": wait_until_quiet(args, "step")}
    with EventStorage(start_iter=10_000) as storage:
        times = time_interleaved(
            steps,
            device,
            args.warmup,
            args.reps,
            before_each=lambda r: torch.manual_seed(args.seed + 1000 + r),
            guard=(args, "step"),
            info=info,
        )
    return models, logs, times, info, storage


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
# A benchmark part: add_arguments(ap) adds its options; run(args, device, results) measures and
# prints, adding its figures to results; prepare(ap, args, device), if given, runs after parsing
# and returns True when the process has done its work (a worker) and should exit.
Part = collections.namedtuple("Part", "add_arguments run prepare", defaults=(None,))


def main(prog, description, parts, argv=None):
    """Parses the options of `parts` ({name: Part}; --part chooses when there are several), runs
    the chosen ones in order and writes --json."""
    ap = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    if len(parts) > 1:
        ap.add_argument("--part", default="all", choices=[*parts, "all"])
    else:
        ap.set_defaults(part=next(iter(parts)))
    add_device_args(ap)
    for part in parts.values():
        part.add_arguments(ap)
    add_quiet_args(ap)
    args = ap.parse_args(argv)
    device, threads = init_device(ap, args)
    for part in parts.values():
        if part.prepare is not None and part.prepare(ap, args, device):
            return 0

    print(
        f"{prog}: python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"device {device.type} ({device_name(device)}), {os.cpu_count()} CPUs, threads {threads}, "
        f"part {args.part}"
    )
    results = {}
    for name, part in parts.items():
        if args.part in (name, "all"):
            part.run(args, device, results)

    if args.json:
        options = {k: v for k, v in vars(args).items() if k != "mem_worker"}
        out = {"config": run_config(options, threads, device, cpus=os.cpu_count()), **results}
        write_json(args.json, out)
        print(f"\nwrote {args.json}")
    return 0
