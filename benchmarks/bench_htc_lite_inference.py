#!/usr/bin/env python
# Copyright (c) fasa_seesaw contributors.
"""
Benchmark: HTC-Lite's inference speed against Cascade Mask R-CNN's at LVIS v1 scale, as ratios
of images/s measured in one run on the same input.

The real R50-FPN models of the LVIS v1 configs (1203 classes, 300 detections per image):
  Cascade (per-stage masks)  cascade_mask_rcnn_R_50_FPN_2x_seesaw_random_lvis_v1.yaml: the Seesaw
                             entry's (mmdetection's) cascade, a mask head per stage whose three
                             predictions are averaged on every detection
  Cascade (one mask head)    the same, MODEL.ROI_BOX_CASCADE_HEAD.MASK_HEADS one (detectron2's)
  HTC-Lite                   htc_lite_R_50_FPN_2x_seesaw_random_lvis_v1.yaml: one mask head and the
                             global context encoder (on P6, added to every RoI feature)
Two parts, both timed interleaved over one image (batch 1) with random weights:
  full   the whole inference (backbone, RPN, three box stages, per-class NMS, masks, pasting at
         the image size). The RPN still runs, but the box heads get 1,000 fixed proposals (the
         test-time RPN count) instead of a random RPN's few. With random classifiers nearly every
         (RoI, class) pair passes the 1e-4 score threshold, so the per-class NMS works on far
         more candidates than a trained model's: that cost, the same in every variant, shrinks
         the ratios.
  masks  what differs between the variants: the mask branch on 300 given detections (and, for
         HTC-Lite, the context encoder on the image's features), as detectron2's
         forward_with_given_boxes runs it.
Reported per part: median/p10/p90 ms per image, images/s, and the median over repetitions of
(variant time / HTC-Lite time of the same repetition), i.e. HTC-Lite's speed-up.

Usage (from the repository root):
    python benchmarks/bench_htc_lite_inference.py                   # CPU, short side 800
    python benchmarks/bench_htc_lite_inference.py --reps 5 --json out.json
    python benchmarks/bench_htc_lite_inference.py --device cuda
"""

import fasa_common  # (first: sets the data root before detectron2 is imported)

# isort: split
import numpy as np
import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from common import device_name, report_foreign, stats_vs_base, time_interleaved, wait_until_quiet
from fasa_common import LVIS_DIR, Part, image_hw, inject_proposals, make_batch
from fasa_seesaw import add_fasa_seesaw_config

BASE = "HTC-Lite"
VARIANTS = {
    "Cascade (per-stage masks)": ("cascade_mask_rcnn_R_50_FPN_2x_seesaw_random_lvis_v1.yaml", []),
    "Cascade (one mask head)": (
        "cascade_mask_rcnn_R_50_FPN_2x_seesaw_random_lvis_v1.yaml",
        ["MODEL.ROI_BOX_CASCADE_HEAD.MASK_HEADS", "one"],
    ),
    "HTC-Lite": ("htc_lite_R_50_FPN_2x_seesaw_random_lvis_v1.yaml", []),
}


def add_arguments(ap):
    ap.add_argument("--image-size", type=int, default=800, help="short side (LVIS test: 800)")
    ap.add_argument("--proposals", type=int, default=1000, help="proposals per image (full)")
    ap.add_argument("--detections", type=int, default=300, help="given detections (masks)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=None, help="repetitions (CPU 3, CUDA 20)")


def prepare(ap, args, device):
    if args.reps is None:
        args.reps = 20 if device.type == "cuda" else 3
    # make_batch's options: one image, its ground truth only shapes the proposals.
    args.batch, args.gt_per_image, args.fg_per_image = 1, 12, 128
    return False


def build(name, args, device):
    cfg_file, extra = VARIANTS[name]
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    cfg.merge_from_file(str(LVIS_DIR / cfg_file))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device] + extra)
    cfg.freeze()
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    model.eval()
    return cfg, model


def run(args, device, results):
    H, W = image_hw(args.image_size)
    print(
        f"\nInference, R50-FPN LVIS v1 configs (1203 classes), one image of {H}x{W}, "
        f"{args.proposals} proposals, {args.detections} detections for the mask part; "
        f"device={device.type} ({device_name(device)}), threads={torch.get_num_threads()}, "
        f"torch {torch.__version__}, {args.reps} reps after {args.warmup} warm-up, interleaved\n",
        flush=True,
    )
    (image,) = make_batch(args, device, args.proposals)
    inputs = [{"image": image["image"], "height": H, "width": W}]
    rng = np.random.default_rng(args.seed)
    given = image["proposals_override"][: args.detections]
    classes = torch.as_tensor(rng.integers(0, 1203, len(given)), device=device)
    models = {}
    for name in VARIANTS:
        _, model = build(name, args, device)
        inject_proposals(model, [image], at_test=True)
        models[name] = model

    def full(model):
        def step():
            with torch.no_grad():
                out = model(inputs)
            assert len(out[0]["instances"]) > 0
            return out

        return step

    def masks(model):
        with torch.no_grad():
            images = model.preprocess_image(inputs)
            features = model.backbone(images.tensor)

        def step():
            det = Instances((H, W), pred_boxes=Boxes(given), pred_classes=classes)
            with torch.no_grad():
                return model.roi_heads.forward_with_given_boxes(features, [det])

        return step

    rows = {}
    for part, make in (("full", full), ("masks", masks)):
        steps = {name: make(model) for name, model in models.items()}
        info = {"background": wait_until_quiet(args, part)}
        times = time_interleaved(
            steps, device, args.warmup, args.reps, guard=(args, part), info=info
        )
        report_foreign(info["other_processes_cores"], f"the kept {part} repetitions")
        print(f"\n{part}:\n")
        print("| model | median (ms) | p10 (ms) | p90 (ms) | images/s | vs HTC-Lite: time ratio |")
        print("|---|---:|---:|---:|---:|---:|")
        part_rows = {}
        for name in VARIANTS:
            r, vs = stats_vs_base(times, name, BASE, digits=2)
            r["images_per_s"] = 1000.0 / r["median_ms"]
            part_rows[name] = r
            print(
                f"| {name} | {r['median_ms']:.0f} | {r['p10_ms']:.0f} | {r['p90_ms']:.0f} | "
                f"{r['images_per_s']:.3f} | {vs} |"
            )
        rows[part] = {
            "variants": part_rows,
            "discarded_repetitions": info["discarded_repetitions"],
            "other_processes_cores": info["other_processes_cores"],
        }
    results["htc_lite_inference"] = rows


if __name__ == "__main__":
    raise SystemExit(
        fasa_common.main(
            "bench_htc_lite_inference",
            __doc__.split("\n\n")[1],
            {"inference": Part(add_arguments, run, prepare)},
        )
    )
