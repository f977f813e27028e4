#!/usr/bin/env python
# Copyright (c) fasa_seesaw contributors.
"""
What each cost-lowering step of the study regime buys: training seconds per iteration (batch 8)
and inference seconds per image, measured the way the study runs, two single-threaded
train_net.py processes side by side on the 2-core machine.

The steps are cumulative, from the earlier from-scratch study recipe towards the fine-tuning
regime of configs/study/Base-Study.yaml:

    scratch      128 px, BN, nothing frozen, 64 RoIs/image, 256-d box head, 14 px mask RoIs
    frozen       + FrozenBN and the stem and res2 frozen (FREEZE_AT 2), as detectron2's
                   ImageNet-initialised configs
    rois32       + 32 sampled RoIs per image, 128 proposals after NMS in training
    narrow       + 128-d box head FCs, 32-channel mask head
    mask7        + 7 px mask RoIs (14 px mask targets after the head's upsampling)
    px112        + 112 px images (train and test)
    frozen3      + res3 frozen too (FREEZE_AT 3)

    python benchmarks/bench_study_regime.py --json out.json
    python benchmarks/bench_study_regime.py --steps scratch frozen --iters 40

Each step trains --iters iterations twice at once (seeds 0 and 1) on the built-in study
dataset; seconds per iteration are the median of detectron2's per-iteration times after the
first --skip iterations, averaged over the two processes. Inference is timed on --eval-images
images of the study's val split with the model each process has trained.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from common import add_quiet_args, wait_until_quiet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "configs", "study", "mask_rcnn_R_18_FPN_ce_study.yaml")

# Cumulative steps: (name, {key: value}); each step changes the previous step's values. The
# first step sets every knob, so the starting point does not depend on the base config.
STEPS = [
    (
        "scratch",
        {
            "MODEL.WEIGHTS": "", "MODEL.RESNETS.NORM": "BN", "MODEL.BACKBONE.FREEZE_AT": "0",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": "64", "MODEL.RPN.POST_NMS_TOPK_TRAIN": "256",
            "MODEL.ROI_BOX_HEAD.FC_DIM": "256", "MODEL.ROI_MASK_HEAD.CONV_DIM": "64",
            "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": "14",
            "INPUT.MIN_SIZE_TRAIN": "(128,)", "INPUT.MAX_SIZE_TRAIN": "128",
            "INPUT.MIN_SIZE_TEST": "128", "INPUT.MAX_SIZE_TEST": "128",
        },
    ),
    ("frozen", {"MODEL.RESNETS.NORM": "FrozenBN", "MODEL.BACKBONE.FREEZE_AT": "2"}),
    (
        "rois32",
        {"MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": "32", "MODEL.RPN.POST_NMS_TOPK_TRAIN": "128"},
    ),
    ("narrow", {"MODEL.ROI_BOX_HEAD.FC_DIM": "128", "MODEL.ROI_MASK_HEAD.CONV_DIM": "32"}),
    ("mask7", {"MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": "7"}),
    (
        "px112",
        {
            "INPUT.MIN_SIZE_TRAIN": "(112,)", "INPUT.MAX_SIZE_TRAIN": "112",
            "INPUT.MIN_SIZE_TEST": "112", "INPUT.MAX_SIZE_TEST": "112",
        },
    ),
    ("frozen3", {"MODEL.BACKBONE.FREEZE_AT": "3"}),
]  # fmt: skip


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("--steps", nargs="+", default=[s for s, _ in STEPS], metavar="STEP")
    ap.add_argument("--iters", type=int, default=60, help="training iterations per step")
    ap.add_argument("--skip", type=int, default=20, help="iterations left out of the median")
    ap.add_argument("--eval-images", type=int, default=60, help="val images timed per step")
    ap.add_argument("--json", default=None, help="write the results here")
    add_quiet_args(ap)
    args = ap.parse_args(argv)
    unknown = [s for s in args.steps if s not in dict(STEPS)]
    if unknown:
        ap.error(f"unknown step {unknown[0]!r}; steps: {', '.join(s for s, _ in STEPS)}")
    if args.iters <= args.skip + 1:
        ap.error("--iters must exceed --skip + 1")
    return args


def step_values(name):
    values = {}
    for step, changes in STEPS:
        values.update(changes)
        if step == name:
            return values
    raise KeyError(name)


def eval_subset(tmp, n):
    """The first n images of the study's val split as a dataset for --dataset."""
    from fasa_seesaw.data import prepare_datasets
    from fasa_seesaw.data.synth import STUDY, dataset_paths

    prepare_datasets(["longtail_synth_study_val"])
    paths = dataset_paths(STUDY)
    with open(paths["val_json"], encoding="utf-8") as f:
        data = json.load(f)
    keep = {im["id"] for im in data["images"][:n]}
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    out = os.path.join(tmp, "val_subset.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return f"regime_val_subset={out}:{paths['val_image_root']}"


def iteration_times(out_dir):
    """detectron2's per-iteration 'time' values, one per logged iteration window."""
    times = []
    with open(os.path.join(out_dir, "metrics.json"), encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if "time" in rec:
                times.append((rec["iteration"], rec["time"]))
    return times


def run_pair(opts, args, tmp, name):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs, outs = [], []
    for seed in (0, 1):
        out = os.path.join(tmp, name, f"seed{seed}")
        outs.append(out)
        cmd = [
            sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", BASE,
            "--dataset", args.subset,
            "SEED", str(seed), "OUTPUT_DIR", out, "SOLVER.MAX_ITER", str(args.iters),
            "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "10", "FASA_SEESAW.PROGRESS_PERIOD", "0",
            "DATASETS.TEST", "('regime_val_subset',)",
            "TEST.LVIS.ENGINE", "hotcoco",
        ] + opts  # fmt: skip
        log = open(os.path.join(tmp, f"{name}_{seed}.log"), "w")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log), log))
    for proc, log in procs:
        proc.wait()
        log.close()
        if proc.returncode:
            sys.exit(f"[regime] step {name} failed; see {log.name}")
    per_iter, per_image = [], []
    for out in outs:
        its = [t for it, t in iteration_times(out) if it >= args.skip]
        per_iter.append(sum(its) / len(its))
        per_image.append(inference_time(out))
    return per_iter, per_image


def inference_time(out):
    """Seconds per image of detectron2's inference log line ('Total inference pure compute')."""
    with open(os.path.join(out, "log.txt"), encoding="utf-8") as f:
        for line in f:
            if "Total inference pure compute time" in line:
                # "... pure compute time: 0:00:12 (0.212345 s / iter per device, on 1 devices)"
                return float(line.split("(")[1].split(" s")[0])
    return None


def main(argv=None):
    args = parse_args(argv)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "threads_per_run": 1}
    results = {"machine": machine, "iters": args.iters, "skip": args.skip, "steps": []}
    with tempfile.TemporaryDirectory() as tmp:
        # The val split limited to --eval-images: inference cost per image, not the full split.
        args.subset = eval_subset(tmp, args.eval_images)
        for name in args.steps:
            load = wait_until_quiet(args, name)
            t0 = time.perf_counter()
            opts = [x for kv in step_values(name).items() for x in kv]
            per_iter, per_image = run_pair(opts, args, tmp, name)
            row = {
                "step": name,
                "values": step_values(name),
                "s_per_iter": per_iter,
                "s_per_iter_mean": sum(per_iter) / 2,
                "s_per_image_inference": per_image,
                "wall_s": round(time.perf_counter() - t0, 1),
                "background": load,
            }
            results["steps"].append(row)
            print(
                f"[regime] {name:8s} train {row['s_per_iter_mean']:.3f} s/it "
                f"(seeds {per_iter[0]:.3f}, {per_iter[1]:.3f}); inference "
                f"{per_image[0]:.3f}, {per_image[1]:.3f} s/image",
                flush=True,
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
