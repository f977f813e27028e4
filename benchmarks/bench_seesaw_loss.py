#!/usr/bin/env python
# Copyright (c) fasa_seesaw contributors.
"""
Benchmark: forward + backward of the Seesaw classification loss, as one training step of the
box predictor does it (count update, then the loss, then backward through the logits).

Compared:
  ours       fasa_seesaw.modeling.seesaw_loss: ``SeesawLoss.update_counts`` (``count_foreground``)
             + ``seesaw_losses``, as ``SeesawLoss.forward`` does it without its accuracy logging
             (sync-free, R x C offsets formed for every RoI).
  reference  ``reference_style_seesaw`` below, written the way mmdetection's SeesawLoss does it
             (mmdet/models/losses/seesaw_loss.py): a Python loop over the batch's unique labels
             to update the counts, the dense C x C sample-ratio matrix, boolean-mask selection
             of the foreground rows, seesaw weights built multiplicatively and then ``log()``-ed.

Before timing, both are run once on the benchmark inputs from the same count state and must give
the same loss values (rtol 1e-5) and the same gradients w.r.t. the logits, so the comparison is
between two implementations of the same function.

Inputs (defaults = LVIS v1 training): R = 1024 sampled RoIs, C = 1203 classes, logits (R, C+2),
~25% foreground RoIs whose labels are drawn from LVIS v1's per-category image counts (a long
tail: 1 to 1977 images per class; falls back to a Zipf law if --classes != 1203), and initial
cumulative counts drawn from the same distribution (--init-fg foreground RoIs in total, so rare
classes start at 0 or a handful, frequent ones at thousands).

Usage:
    python benchmarks/bench_seesaw_loss.py                       # CPU, all cores
    python benchmarks/bench_seesaw_loss.py --threads 1
    python benchmarks/bench_seesaw_loss.py --device cuda --json out.json
"""

import argparse
import numpy as np
import sys
import torch
from torch.nn import functional as F

from common import (
    ForeignCpu,
    add_device_args,
    device_name,
    init_device,
    lvis_image_counts,
    run_config,
    stats_ms,
    time_interleaved,
    write_json,
)
from fasa_seesaw.modeling.seesaw_loss import SeesawLoss, seesaw_losses

P, Q, EPS = 0.8, 2.0, 1e-2


# --------------------------------------------------------------------------------------------
# (b) reference-style implementation (mmdetection's algorithm)
# --------------------------------------------------------------------------------------------
def reference_style_seesaw(cls_score, labels, cum_samples, num_classes, p=P, q=Q, eps=EPS):
    """
    Seesaw loss written like mmdetection's ``SeesawLoss.forward`` + ``seesaw_ce_loss``.

    Args:
        cls_score: (R, C+2) logits; last two columns are [foreground, background].
        labels: (R,) in [0, C], C meaning background.
        cum_samples: (C+1,) float buffer of cumulative counts (background slot included);
            updated in place with this batch, as mmdetection does.

    Returns:
        (loss_cls, loss_objectness), each a sum over the rows divided by R (avg_factor = R).
    """
    num_rois = max(cls_score.shape[0], 1)
    pos_inds = labels < num_classes
    obj_labels = (labels == num_classes).long()  # 0 = foreground, 1 = background

    # accumulate the samples for each category (one host sync per unique label on CUDA)
    unique_labels = labels.unique()
    for u_l in unique_labels:
        inds_ = labels == u_l.item()
        cum_samples[u_l] += inds_.sum()

    cls_score_classes, cls_score_objectness = cls_score[..., :-2], cls_score[..., -2:]
    loss_cls = (
        _reference_seesaw_ce(
            cls_score_classes[pos_inds],
            labels[pos_inds],
            cum_samples[:num_classes],
            num_classes,
            p,
            q,
            eps,
        ).sum()
        / num_rois
    )
    loss_obj = F.cross_entropy(cls_score_objectness, obj_labels, reduction="sum") / num_rois
    return loss_cls, loss_obj


def _reference_seesaw_ce(cls_score, labels, cum_samples, num_classes, p, q, eps):
    onehot_labels = F.one_hot(labels, num_classes)
    seesaw_weights = cls_score.new_ones(onehot_labels.size())

    # mitigation factor: dense C x C matrix, then gather the rows of the batch's labels
    if p > 0:
        sample_ratio_matrix = cum_samples[None, :].clamp(min=1) / cum_samples[:, None].clamp(min=1)
        index = (sample_ratio_matrix < 1.0).float()
        sample_weights = sample_ratio_matrix.pow(p) * index + (1 - index)
        mitigation_factor = sample_weights[labels.long(), :]
        seesaw_weights = seesaw_weights * mitigation_factor

    # compensation factor
    if q > 0:
        scores = F.softmax(cls_score.detach(), dim=1)
        self_scores = scores[torch.arange(0, len(scores), device=scores.device), labels.long()]
        score_matrix = scores / self_scores[:, None].clamp(min=eps)
        index = (score_matrix > 1.0).float()
        compensation_factor = score_matrix.pow(q) * index + (1 - index)
        seesaw_weights = seesaw_weights * compensation_factor

    cls_score = cls_score + (seesaw_weights.log() * (1 - onehot_labels))
    return F.cross_entropy(cls_score, labels, weight=None, reduction="none")


# --------------------------------------------------------------------------------------------
# (a) ours, as the box predictor's SeesawLoss computes it
# --------------------------------------------------------------------------------------------
def ours_seesaw(logits, gt_classes, loss: SeesawLoss):
    """``SeesawLoss.forward`` without its accuracy logging (a host sync for the EventStorage):
    the count update (in place, into ``loss.class_counts``), then ``seesaw_losses``."""
    loss.update_counts(gt_classes)
    return seesaw_losses(logits, gt_classes, loss.class_counts, loss.p, loss.q, loss.eps)


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def class_distribution(num_classes, zipf):
    """Per-class probabilities: LVIS v1 image counts when C == 1203, else a Zipf law."""
    if num_classes == 1203 and zipf is None:
        try:
            counts = lvis_image_counts()
            return counts / counts.sum(), "LVIS v1 category image counts"
        except ImportError:
            pass
    a = 1.0 if zipf is None else zipf
    rng = np.random.default_rng(0)
    w = 1.0 / np.arange(1, num_classes + 1, dtype=np.float64) ** a
    w = w[rng.permutation(num_classes)]  # frequent classes are not the low ids
    return w / w.sum(), f"Zipf(a={a:g})"


def make_inputs(args, device):
    rng = np.random.default_rng(args.seed)
    C, R = args.classes, args.rois
    probs, dist_name = class_distribution(C, args.zipf)
    init_counts = rng.multinomial(args.init_fg, probs)
    num_fg = int(round(args.fg_fraction * R))
    gt = np.full(R, C, dtype=np.int64)
    gt[:num_fg] = rng.choice(C, size=num_fg, p=probs)
    gt = gt[rng.permutation(R)]
    gen = torch.Generator().manual_seed(args.seed)
    # cosine-classifier-like logits (NormedLinear, temperature 20): |z| <= 20, spread of a few units
    logits = (torch.randn(R, C + 2, generator=gen) * 2.0).clamp(-20, 20)
    info = {
        "class_distribution": dist_name,
        "num_fg": num_fg,
        "unique_fg_labels": int(np.unique(gt[gt < C]).size),
        "init_counts_total": int(init_counts.sum()),
        "init_counts_zero_classes": int((init_counts == 0).sum()),
        "init_counts_max": int(init_counts.max()),
    }
    return (
        logits.to(device),
        torch.from_numpy(gt).to(device),
        torch.from_numpy(init_counts).to(device),
        info,
    )


# --------------------------------------------------------------------------------------------
# runners
# --------------------------------------------------------------------------------------------
def run_ours(logits0, gt, counts0):
    """counts0: (C,) long, the initial SeesawLoss.class_counts. Returns a closure doing one
    fwd + bwd."""
    loss = SeesawLoss(counts0.numel(), p=P, q=Q, eps=EPS).to(counts0.device)
    loss.class_counts.copy_(counts0)
    x = logits0.clone().requires_grad_(True)

    def step():
        x.grad = None
        loss_cls, loss_obj = ours_seesaw(x, gt, loss)
        (loss_cls + loss_obj).backward()
        return loss_cls, loss_obj, x.grad

    return step


def run_reference(logits0, gt, counts0):
    """mmdetection keeps a float (C+1,) buffer, background slot included."""
    C = counts0.numel()
    cum = torch.zeros(C + 1, dtype=torch.float32, device=counts0.device)
    cum[:C] = counts0.float()
    x = logits0.clone().requires_grad_(True)

    def step():
        x.grad = None
        loss_cls, loss_obj = reference_style_seesaw(x, gt, cum, C)
        (loss_cls + loss_obj).backward()
        return loss_cls, loss_obj, x.grad

    return step


def check_equal(logits0, gt, counts0, rtol, atol):
    la, oa, ga = run_ours(logits0, gt, counts0)()
    lb, ob, gb = run_reference(logits0, gt, counts0)()
    torch.testing.assert_close(la, lb, rtol=rtol, atol=0.0, msg=lambda m: "loss_cls: " + m)
    torch.testing.assert_close(oa, ob, rtol=rtol, atol=0.0, msg=lambda m: "loss_obj: " + m)
    torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol, msg=lambda m: "grad: " + m)
    return {
        "loss_cls": [la.item(), lb.item()],
        "loss_obj": [oa.item(), ob.item()],
        "grad_max_abs_diff": (ga - gb).abs().max().item(),
        "grad_max_abs": gb.abs().max().item(),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_device_args(ap)  # --device, --threads, --seed, --json
    ap.add_argument(
        "--classes", type=int, default=1203, help="C, number of classes (LVIS v1: 1203)"
    )
    ap.add_argument(
        "--rois", type=int, default=1024, help="R, sampled RoIs per step (default 1024)"
    )
    ap.add_argument("--fg-fraction", type=float, default=0.25, help="foreground share of the RoIs")
    ap.add_argument(
        "--init-fg",
        type=int,
        default=512_000,
        help="foreground RoIs already counted before the step (default 512000 = "
        "2000 steps x 256)",
    )
    ap.add_argument(
        "--zipf",
        type=float,
        default=None,
        help="use a Zipf(a) class distribution instead of the LVIS v1 counts",
    )
    ap.add_argument("--reps", type=int, default=50, help="timed repetitions (default 50)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed warm-up iterations each")
    args = ap.parse_args(argv)
    device, threads = init_device(ap, args)

    logits0, gt, counts0, info = make_inputs(args, device)
    check = check_equal(logits0, gt, counts0, rtol=1e-5, atol=1e-7)

    steps = {
        "ours (SeesawLoss.update_counts + seesaw_losses)": run_ours(logits0, gt, counts0),
        "reference-style (mmdet algorithm)": run_reference(logits0, gt, counts0),
    }
    with ForeignCpu() as foreign:
        times = time_interleaved(steps, device, args.warmup, args.reps)
    res = {name: stats_ms(t) for name, t in times.items()}
    names = list(steps)
    speedup = res[names[1]]["median_ms"] / res[names[0]]["median_ms"]

    dev_name = device_name(device)
    header = (
        f"Seesaw loss fwd+bwd, R={args.rois} RoIs ({info['num_fg']} fg, "
        f"{info['unique_fg_labels']} unique fg labels), C={args.classes}, labels ~ "
        f"{info['class_distribution']}; device={device.type} ({dev_name}), "
        f"threads={threads}, torch {torch.__version__}, {args.reps} reps after "
        f"{args.warmup} warm-up"
    )
    print(header)
    print(
        f"check: loss_cls ours={check['loss_cls'][0]:.7g} ref={check['loss_cls'][1]:.7g}, "
        f"loss_obj ours={check['loss_obj'][0]:.7g} ref={check['loss_obj'][1]:.7g}, "
        f"grad max |diff|={check['grad_max_abs_diff']:.2e} "
        f"(max |grad|={check['grad_max_abs']:.2e}) OK"
    )
    foreign.report("timing")
    print()
    print("| implementation | median (ms) | p10 (ms) | p90 (ms) | speed-up vs reference |")
    print("|---|---:|---:|---:|---:|")
    ref_med = res[names[1]]["median_ms"]
    for name in names:
        r = res[name]
        print(
            f"| {name} | {r['median_ms']:.3f} | {r['p10_ms']:.3f} | {r['p90_ms']:.3f} | "
            f"{ref_med / r['median_ms']:.2f}x |"
        )
    print()
    print(f"speed-up (reference median / ours median): {speedup:.2f}x")

    if args.json:
        out = {
            "config": run_config(vars(args), threads, device, **info),
            "check": check,
            "results": res,
            "speedup": speedup,
            "other_processes_cores": foreign.cores,
        }
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
