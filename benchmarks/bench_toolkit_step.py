#!/usr/bin/env python
# Copyright (c) fasa_seesaw contributors.
"""
Benchmark: what each training-time option of the long-tail toolkit costs in a training step at
LVIS v1 scale, as a ratio against the plain softmax-CE step timed in the same run.

One training step (forward + backward + SGD step) of the real Mask R-CNN R50-FPN built from the
LVIS v1 configs (1203 classes, 512 sampled RoIs per image, --batch images), for:
  CE                      mask_rcnn_R_50_FPN_2x_ce_random_lvis_v1.yaml (the base)
  NR                      mask_rcnn_R_50_FPN_2x_nr_random_lvis_v1.yaml (NMS re-sampling, discrete)
  NR matched              the same, MODEL.RPN.NMS_RESAMPLING.MODE matched
  EQL, EQLv2              mask_rcnn_R_50_FPN_2x_{eql,eqlv2}_random_lvis_v1.yaml
  Seesaw                  mask_rcnn_R_50_FPN_2x_seesaw_random_lvis_v1.yaml
  Seesaw dual-head stage  mask_rcnn_R_50_FPN_1x_seesaw_dual_head_rfs_lvis_v1.yaml (frozen model,
                          a second classifier trained)
  CE+FASA                 mask_rcnn_R_50_FPN_2x_fasa_random_lvis_v1.yaml (Gaussian virtual features)
  CE+FASA SMOTE / MoEx    the same with MODEL.FASA.AUGMENTATION smote / moex
The inputs are bench_fasa_step.py's (fasa_common.make_batch: synthetic images and ground truth,
512 proposals per image replacing the random-init RPN's output after the RPN has run, so NMS
re-sampling's work in the RPN is timed while the ROI heads see a trained RPN's RoI mix). What the
options read from the training set on their first step (EQL's frequencies, NR's class groups,
FASA's bank and probabilities, SMOTE/MoEx's feature store) is set from LVIS v1's statistics.
torch.manual_seed makes every variant see identical inputs and RoI sampling per repetition;
the variants are interleaved. Reported: median/p10/p90 ms per step and, per option, the median
over repetitions of (option step / CE step of the same repetition).

Usage (from the repository root):
    python benchmarks/bench_toolkit_step.py                       # CPU, 512 px, 2 images
    python benchmarks/bench_toolkit_step.py --variants CE NR EQL --reps 5
    python benchmarks/bench_toolkit_step.py --device cuda --image-size 800 --json out.json
"""

import fasa_common  # (first: sets the data root before detectron2 is imported)

# isort: split
import numpy as np
import torch

from common import device_name, report_foreign, stats_vs_base
from fasa_common import (
    TOOLKIT_VARIANTS,
    Part,
    image_hw,
    make_batch,
    num_proposals,
    time_variant_steps,
)

BASE = "CE"


def add_arguments(ap):
    ap.add_argument("--image-size", type=int, default=None, help="short side (CPU 512, CUDA 800)")
    ap.add_argument("--batch", type=int, default=2, help="images per step")
    ap.add_argument("--gt-per-image", type=int, default=12)
    ap.add_argument("--fg-per-image", type=int, default=128, help="foreground proposals/image")
    ap.add_argument(
        "--lr",
        type=float,
        default=0.0,
        help="SGD learning rate (default 0: the same arithmetic as any lr, and the random-init "
        "model, so proposals and sampled RoIs stay fixed across repetitions)",
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=None, help="repetitions (CPU 5, CUDA 20)")
    ap.add_argument(
        "--variants", nargs="+", default=list(TOOLKIT_VARIANTS), choices=list(TOOLKIT_VARIANTS)
    )


def prepare(ap, args, device):
    if args.image_size is None:
        args.image_size = 800 if device.type == "cuda" else 512
    if args.reps is None:
        args.reps = 20 if device.type == "cuda" else 5
    if BASE not in args.variants:
        args.variants = [BASE] + list(args.variants)
    return False


def run(args, device, results):
    H, W = image_hw(args.image_size)
    print(
        f"\nTraining step (forward + backward + SGD step), Mask R-CNN R50-FPN, LVIS v1 configs, "
        f"{args.batch} images of {H}x{W}, {args.gt_per_image} GT instances/image, 1203 classes, "
        f"512 RoIs/image; device={device.type} ({device_name(device)}), "
        f"threads={torch.get_num_threads()}, torch {torch.__version__}, {args.reps} reps after "
        f"{args.warmup} warm-up, interleaved\n",
        flush=True,
    )
    batch = make_batch(args, device, num_proposals(args))
    _, logs, times, info, _ = time_variant_steps(args, device, args.variants, batch)
    report_foreign(info["other_processes_cores"], "the kept step repetitions")
    rows = {}
    print("| option | median (ms) | p10 (ms) | p90 (ms) | vs CE: median ratio [p10, p90] |")
    print("|---|---:|---:|---:|---:|")
    for name in args.variants:
        r, vs = stats_vs_base(times, name, BASE, digits=3)
        r["losses_finite"] = all(np.isfinite(v) for d in logs[name] for v in d.values())
        rows[name] = r
        print(f"| {name} | {r['median_ms']:.0f} | {r['p10_ms']:.0f} | {r['p90_ms']:.0f} | {vs} |")
    bad = [n for n, r in rows.items() if not r["losses_finite"]]
    if bad:
        print(f"\nnon-finite losses in: {', '.join(bad)}")
    results["toolkit_step"] = {
        "variants": rows,
        "discarded_repetitions": info["discarded_repetitions"],
        "other_processes_cores": info["other_processes_cores"],
    }


if __name__ == "__main__":
    raise SystemExit(
        fasa_common.main(
            "bench_toolkit_step",
            __doc__.split("\n\n")[1],
            {"step": Part(add_arguments, run, prepare)},
        )
    )
