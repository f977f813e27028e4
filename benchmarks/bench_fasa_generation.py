#!/usr/bin/env python
# Copyright (c) fasa_seesaw contributors.
"""
Benchmark: FASA's virtual-feature generation and its validation-loss pass, at LVIS v1 scale
(bench_fasa_step.py times the training step; bench_fasa.py runs both).

Parts (--part generation|pass|all):

  generation  Virtual-feature generation at 1203 classes x 1024-d: fasa_sampling.
              sample_virtual_features (vectorised; compact layout: only drawn rows, the CPU
              default; fixed layout: C*k rows with a 0/1 weight, sync-free, the accelerator
              default) against
                loop       a per-class Python loop as the reference describes it: for each class
                           c, if random() < p_c and c is seen, draw k features mu_c + sigma_c *
                           randn and append; then torch.cat (only drawn rows come out);
                reference  the official code's fa_generate: one torch.rand(C), torch.where over
                           the drawn classes, then a loop over those (per-class seen check,
                           sqrt, normal draw), torch.cat.
              For several probability regimes (sum p = 1 at initialisation, p x 10, p = 1), both
              for generation alone and for generation + classifier + CE forward/backward on the
              rows produced (what a step pays).

  pass        One FASA validation-loss pass (FASAAdaptationHook.validation_losses) against one
              inference + LVIS evaluation pass (detectron2 inference_on_dataset with
              fasa_seesaw.evaluation.LongTailLVISEvaluator, evaluator built inside, as
              DefaultTrainer.test does) over the same --val-images images of the built-in
              synthetic split longtail_synth_quickstart_val, with the quickstart model
              configs/quickstart/mask_rcnn_R_18_FPN_fasa_seesaw_quickstart.yaml (random init
              unless --pass-weights).

Usage (from the repository root):
    python benchmarks/bench_fasa_generation.py                          # both parts, CPU
    python benchmarks/bench_fasa_generation.py --part generation --json gen.json
    python benchmarks/bench_fasa_generation.py --part pass --val-images 0 --pass-reps 5
"""

import fasa_common  # (first: sets the data root before detectron2 is imported)

# isort: split
import contextlib
import io
import json
import numpy as np
import os
import random
import sys
import tempfile
import time
import torch
from torch.nn import functional as F

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from common import (
    device_name,
    lvis_image_counts,
    report_foreign,
    run_when_quiet,
    stats_ms,
    time_interleaved,
    wait_until_quiet,
)
from fasa_common import REPO, Part, lvis_fasa_probs
from fasa_seesaw import add_fasa_seesaw_config
from fasa_seesaw.modeling.fasa_sampling import sample_virtual_features

QUICKSTART_CFG = REPO / "configs" / "quickstart" / "mask_rcnn_R_18_FPN_fasa_seesaw_quickstart.yaml"


# --------------------------------------------------------------------------------------------
# part 2: virtual-feature generation
# --------------------------------------------------------------------------------------------
def loop_generate(mean, var, seen, probs, k):
    """Per-class Python loop, as the reference describes it: only drawn rows come out."""
    C, D = mean.shape
    p = probs.tolist()
    s = seen.tolist()
    feats, labels = [], []
    for c in range(C):
        if random.random() < p[c] and s[c]:
            std = var[c].clamp(min=0).sqrt()
            feats.append(mean[c] + std * torch.randn(k, D, device=mean.device, dtype=mean.dtype))
            labels.extend([c] * k)
    if not feats:
        return mean.new_zeros((0, D)), torch.zeros(0, dtype=torch.long, device=mean.device)
    return torch.cat(feats, 0), torch.tensor(labels, device=mean.device)


def reference_generate(mean, var, count, probs, k):
    """The official FASA code's fa_generate (mmdet ConvFCFASABBoxHead), k samples per class."""
    C, D = mean.shape
    rand = torch.rand(C, device=mean.device)
    uniq_c = torch.where(rand < probs)[0]
    feats, labels = [], []
    for c in uniq_c:
        c = int(c)
        if count[c] == 0:
            continue
        std = torch.sqrt(var[c])
        feats.append(mean[c] + std * torch.normal(0, 1, size=(k, D)).to(mean.device))
        labels.extend([c] * k)
    if not feats:
        return mean.new_zeros((0, D)), torch.zeros(0, dtype=torch.long, device=mean.device)
    return torch.cat(feats, 0), torch.tensor(labels, device=mean.device)


def part_generation(args, device, results):
    C, D, k = 1203, 1024, args.samples_per_class
    counts = lvis_image_counts()
    p0 = torch.as_tensor(lvis_fasa_probs(), dtype=torch.float32)
    mean = (torch.randn(C, D, generator=torch.Generator().manual_seed(0)).abs() * 0.3).to(device)
    var = (torch.rand(C, D, generator=torch.Generator().manual_seed(1)) * 0.1).to(device)
    count = torch.as_tensor(np.maximum(counts, 1), dtype=torch.long, device=device)
    seen = count > 0
    cls = torch.nn.Linear(D, C + 1).to(device)
    print(
        f"\n## Part 2: virtual-feature generation, C={C} classes x D={D}, samples_per_class={k}; "
        f"device={device.type} ({device_name(device)}), threads={torch.get_num_threads()}, "
        f"{args.gen_reps} reps after 10 warm-up, interleaved\n",
        flush=True,
    )

    # sanity: with p = 1 all three produce every class, with the right per-class statistics
    ones = torch.ones(C, device=device)
    torch.manual_seed(0)
    random.seed(0)
    fa, la, wa = sample_virtual_features(mean, var, seen, ones, k)
    fb, lb = loop_generate(mean, var, seen, ones, k)
    fc, lc = reference_generate(mean, var, count, ones, k)
    assert torch.equal(la, lb) and torch.equal(la, lc) and bool((wa == 1).all())
    for f in (fa, fb, fc):
        z = (f - mean.repeat_interleave(k, 0)) / var.sqrt().repeat_interleave(k, 0)
        assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01, "bad statistics"
    print("check (p = 1): all three give C*k rows, labels equal, standardised draws ~ N(0, 1): OK")

    regimes = {
        "p = inverse frequency (init, sum p = 1)": p0,
        "p x 10 (sum p = 10, ~24 epochs of up-steps)": (p0 * 10).clamp(max=1),
        "p = 1 (every class drawn)": torch.ones(C),
    }
    rows = {}
    loads = []
    for regime, p in regimes.items():
        p = p.to(device)

        def measure(p=p):
            fns = {
                "ours, compact (CPU default)": lambda p=p: sample_virtual_features(
                    mean, var, seen, p, k, compact=True
                ),
                "ours, fixed (accelerator default)": lambda p=p: sample_virtual_features(
                    mean, var, seen, p, k, compact=False
                ),
                "loop: per-class Python loop": lambda p=p: loop_generate(mean, var, seen, p, k),
                "reference: fa_generate": lambda p=p: reference_generate(mean, var, count, p, k),
            }

            def with_cls(fn, weighted):
                def run():
                    out = fn()
                    feats, labels = out[0], out[1]
                    cls.weight.grad = None
                    logits = cls(feats)
                    if weighted:
                        w = out[2]
                        loss = (
                            F.cross_entropy(logits, labels, reduction="none") * w
                        ).sum() / w.sum().clamp(min=1)
                    else:
                        loss = F.cross_entropy(logits, labels) if len(labels) else logits.sum() * 0
                    loss.backward()

                return run

            full = {
                name + " + classifier fwd/bwd": with_cls(fn, name.startswith("ours"))
                for name, fn in fns.items()
            }
            torch.manual_seed(args.seed)
            random.seed(args.seed)
            t_gen = time_interleaved(fns, device, 10, args.gen_reps)
            t_full = time_interleaved(full, device, 5, max(args.gen_reps // 4, 5))
            # rows produced and drawn
            drawn = []
            for _ in range(50):
                drawn.append(
                    float(sample_virtual_features(mean, var, seen, p, k, compact=False)[2].sum())
                )
            return {
                "expected_drawn_rows": float(p.clamp(0, 1).sum()) * k,
                "mean_drawn_rows_ours": float(np.mean(drawn)),
                "generation": {n: stats_ms(t) for n, t in t_gen.items()},
                "with_classifier": {n: stats_ms(t) for n, t in t_full.items()},
            }

        rows[regime], cores, runs = run_when_quiet(args, "generation", measure)
        rows[regime]["other_processes_cores"] = cores
        loads.append(cores)
    known = [c for c in loads if c is not None]
    gen_foreign = max(known) if known else None
    report_foreign(gen_foreign, "generation timing (worst regime)")
    print(
        "\n| p regime | implementation | rows out | generation median (ms) | p10 | p90 "
        "| + classifier & CE fwd/bwd median (ms) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for regime, r in rows.items():
        gnames = list(r["generation"])
        fnames = list(r["with_classifier"])
        for gname, fname in zip(gnames, fnames):
            g, f = r["generation"][gname], r["with_classifier"][fname]
            out_rows = (
                f"{C * k}"
                if gname.startswith("ours, fixed")
                else f"~{r['expected_drawn_rows']:.1f}"
            )
            print(
                f"| {regime} | {gname} | {out_rows} | {g['median_ms']:.3f} | {g['p10_ms']:.3f} | "
                f"{g['p90_ms']:.3f} | {f['median_ms']:.3f} |"
            )
    print(
        "\n('rows out': the fixed layout returns C*k rows with a 0/1 weight (sync-free, fixed "
        "shape); the compact layout and the loops return only the drawn rows, ~sum(p)*k)"
    )
    results["generation"] = {
        "other_processes_cores": gen_foreign,
        "classes": C,
        "dim": D,
        "samples_per_class": k,
        "regimes": rows,
    }


# --------------------------------------------------------------------------------------------
# part 3: validation-loss pass vs inference + LVIS evaluation
# --------------------------------------------------------------------------------------------
def register_val_subset(n):
    """First n images (by id) of longtail_synth_quickstart_val as their own LVIS dataset."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from fasa_seesaw.data import prepare_datasets, register_longtail_lvis

    src = "longtail_synth_quickstart_val"
    prepare_datasets([src])
    meta = MetadataCatalog.get(src)
    with open(meta.json_file) as f:
        data = json.load(f)
    images = sorted(data["images"], key=lambda im: im["id"])
    if n > 0:
        images = images[:n]
    ids = {im["id"] for im in images}
    data = dict(
        data, images=images, annotations=[a for a in data["annotations"] if a["image_id"] in ids]
    )
    tmp = tempfile.mkdtemp(prefix="bench_fasa_")
    json_file = os.path.join(tmp, f"quickstart_val_first{len(images)}.json")
    with open(json_file, "w") as f:
        json.dump(data, f)
    name = f"bench_fasa_quickstart_val_first{len(images)}"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_longtail_lvis(name, json_file, meta.image_root)
    return name, len(images), len(data["annotations"]), tmp


def part_pass(args, device, results):
    import logging

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import inference_on_dataset
    from detectron2.utils.logger import setup_logger

    from fasa_seesaw.engine import FASAAdaptationHook
    from fasa_seesaw.evaluation import LongTailLVISEvaluator

    name, n_img, n_ann, tmp = register_val_subset(args.val_images)
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    cfg.merge_from_file(str(QUICKSTART_CFG))
    cfg.merge_from_list(
        [
            "MODEL.WEIGHTS",
            args.pass_weights or "",
            "MODEL.DEVICE",
            args.device,
            "DATASETS.TEST",
            (name,),
            "MODEL.FASA.ADAPT.HELDOUT_DATASET",
            name,
        ]
    )
    cfg.freeze()
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    if args.pass_weights:
        DetectionCheckpointer(model).load(args.pass_weights)
    model.train()
    print(
        f"\n## Part 3: FASA validation-loss pass vs inference + LVIS evaluation, {n_img} images "
        f"({n_ann} instances) of longtail_synth_quickstart_val, {QUICKSTART_CFG.relative_to(REPO)} "
        f"({'weights ' + args.pass_weights if args.pass_weights else 'random init'}); "
        f"device={device.type} ({device_name(device)}), threads={torch.get_num_threads()}, "
        f"{args.pass_reps} reps after 1 warm-up, interleaved\n",
        flush=True,
    )
    hook = FASAAdaptationHook.from_config(cfg, name, period=1)
    eval_detail = {}
    # quieten detectron2's per-pass logging, keep warnings
    setup_logger(name="detectron2", abbrev_name="d2")
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    logging.getLogger("fasa_seesaw").setLevel(logging.WARNING)
    logging.getLogger("lvis").setLevel(logging.ERROR)

    def val_pass():
        _, stats = hook.validation_losses(model)
        eval_detail["val_rois"] = float(sum(c.sum() for _, c in stats))

    def eval_pass():
        t0 = time.perf_counter()
        evaluator = LongTailLVISEvaluator(
            name,
            output_dir=os.path.join(tmp, "eval"),
            max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
        )
        loader = build_detection_test_loader(cfg, name)
        orig = evaluator.evaluate
        te = {}

        def timed_evaluate():
            t = time.perf_counter()
            r = orig()
            te["evaluate_s"] = time.perf_counter() - t
            return r

        evaluator.evaluate = timed_evaluate
        with contextlib.redirect_stdout(io.StringIO()):  # the LVIS API prints its tables
            res = inference_on_dataset(model, loader, evaluator)
        te["total_s"] = time.perf_counter() - t0
        te["num_dets"] = sum(len(p.get("instances", [])) for p in evaluator._predictions)
        eval_detail.setdefault("eval", []).append(te)
        eval_detail["segm_AP"] = res.get("segm", {}).get("AP")
        assert model.training, "inference_on_dataset must restore training mode"

    quiet = wait_until_quiet(args, "pass")
    tinfo = {}
    times = time_interleaved(
        {"FASA validation-loss pass": val_pass, "inference + LVIS evaluation": eval_pass},
        device,
        1,
        args.pass_reps,
        guard=(args, "pass"),
        info=tinfo,
    )
    report_foreign(tinfo["other_processes_cores"], "the kept pass repetitions")
    res = {n: stats_ms(t) for n, t in times.items()}
    ev = eval_detail["eval"][-args.pass_reps :]
    eval_ms = float(np.median([e["evaluate_s"] for e in ev]) * 1e3)
    num_dets = ev[-1]["num_dets"]
    v, e = res["FASA validation-loss pass"], res["inference + LVIS evaluation"]
    print("| pass | median (s) | p10 (s) | p90 (s) | per image (ms) |")
    print("|---|---:|---:|---:|---:|")
    for n, r in res.items():
        print(
            f"| {n} | {r['median_ms'] / 1e3:.2f} | {r['p10_ms'] / 1e3:.2f} | "
            f"{r['p90_ms'] / 1e3:.2f} | "
            f"{r['median_ms'] / n_img:.1f} |"
        )
    print(
        f"\nof the inference + evaluation pass: LVIS evaluation (evaluator.evaluate) median "
        f"{eval_ms / 1e3:.2f} s, inference and loading the rest; {num_dets} detections "
        f"({num_dets / n_img:.0f} per image) evaluated"
    )
    print(
        f"validation-loss pass / (inference + evaluation) = {v['median_ms'] / e['median_ms']:.2f} "
        f"({e['median_ms'] / v['median_ms']:.1f}x cheaper); foreground RoIs scored per pass: "
        f"{eval_detail.get('val_rois', float('nan')):.0f}"
    )
    results["pass"] = {
        "dataset": name,
        "images": n_img,
        "instances": n_ann,
        "weights": args.pass_weights or "random init",
        "background": quiet,
        "other_processes_cores": tinfo["other_processes_cores"],
        "discarded_repetitions": tinfo["discarded_repetitions"],
        "results": res,
        "evaluate_median_ms": eval_ms,
        "num_detections": num_dets,
        "eval_detail": eval_detail,
    }


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def add_generation_args(ap):
    g = ap.add_argument_group("part generation")
    g.add_argument("--gen-reps", type=int, default=200, help="timed calls per implementation")
    g.add_argument("--samples-per-class", type=int, default=1)


def add_pass_args(ap):
    g = ap.add_argument_group("part pass")
    g.add_argument(
        "--val-images", type=int, default=100, help="images of the val split (0: all 200)"
    )
    g.add_argument("--pass-reps", type=int, default=3)
    g.add_argument(
        "--pass-weights",
        default="",
        help="checkpoint for the quickstart model (default: random init)",
    )


GENERATION = Part(add_generation_args, part_generation)
PASS = Part(add_pass_args, part_pass)


def main(argv=None):
    parts = {"generation": GENERATION, "pass": PASS}
    return fasa_common.main("bench_fasa_generation", __doc__, parts, argv)


if __name__ == "__main__":
    sys.exit(main())
