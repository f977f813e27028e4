#!/usr/bin/env python
# Copyright (c) fasa_seesaw contributors.
"""
Benchmark: LVIS evaluation speed and memory at LVIS v1 scale, fast engine against lvis-api.

A synthetic LVIS v1-scale set is generated (deterministic, --seed): 1203 categories whose
frequencies (r/c/f) and ground-truth label distribution follow LVIS v1's training image counts
(detectron2's lvis_v1_category_image_count), --gt-per-image ground-truth boxes per image (LVIS v1
val: about 12), federated lists per image (negatives, a not-exhaustive class now and then), and
--dets detections per image (300, LVIS's cap): 1-3 jittered copies of each ground-truth box
(right class 70% of the time) and random boxes of random classes for the rest, scores uniform.

Parts (--part speed|memory|all):

  speed   --images images (default 5000), bbox. Timed, each once, from detections in memory to
          the metrics:
            reference  lvis-api 0.5.3 as detectron2 calls it: LVISResults(gt, results,
                       max_dets=300) + LVISEval(...).run() (numpy-2 shim)
            ours/dict  fasa_seesaw.evaluation.evaluate_lvis(engine="hotcoco") on the same list
                       of dicts (input checks, the 300 cap, hotcoco's LVIS mode)
            ours/array the same on an (N, 7) array [image_id, x, y, w, h, score, category_id]
          and checks that every metric and every per-category AP is identical (to 1e-6).
  memory  --memory-images images (default 20000, LVIS v1 val scale) with ours/array and
          ours/dict, each in a fresh subprocess; reports the peak resident set size of the
          whole process (ground truth, detections and evaluation; Linux VmHWM).

Usage (from the repository root):
    python benchmarks/bench_lvis_eval.py                      # both parts
    python benchmarks/bench_lvis_eval.py --part speed --images 5000 --json out.json
    python benchmarks/bench_lvis_eval.py --part memory --memory-images 20000
"""

import argparse
import copy
import json
import logging
import numpy as np
import os
import platform
import resource
import subprocess
import sys
import time

from common import _hwm_kb, lvis_image_counts, write_json

W, H = 640, 480


def make_dataset(num_images, gt_per_image, dets_per_image, seed):
    """Synthetic LVIS v1-scale ground truth (dict) and detections (N, 7) array."""
    rng = np.random.default_rng(seed)
    counts = lvis_image_counts()
    C = len(counts)
    freq = np.where(counts <= 10, "r", np.where(counts <= 100, "c", "f"))
    cats = [{"id": i + 1, "name": f"category_{i + 1}", "frequency": str(freq[i])} for i in range(C)]
    p = counts / counts.sum()
    n_gt = rng.poisson(gt_per_image, num_images).clip(1, None)
    total_gt = int(n_gt.sum())
    labels = rng.choice(C, total_gt, p=p) + 1
    wh = np.exp(rng.uniform(np.log(8), np.log(300), (total_gt, 2)))
    xy = rng.uniform(0, 1, (total_gt, 2)) * (np.array([W, H]) - wh).clip(1, None)
    img_of = np.repeat(np.arange(1, num_images + 1), n_gt)
    anns = [
        {
            "id": i + 1,
            "image_id": int(img_of[i]),
            "category_id": int(labels[i]),
            "bbox": [float(xy[i, 0]), float(xy[i, 1]), float(wh[i, 0]), float(wh[i, 1])],
            "area": float(wh[i, 0] * wh[i, 1]),
            "iscrowd": 0,
        }
        for i in range(total_gt)
    ]
    images = []
    starts = np.r_[0, np.cumsum(n_gt)]
    rows = []
    for im in range(num_images):
        lo, hi = starts[im], starts[im + 1]
        present = np.unique(labels[lo:hi])
        neg = rng.choice(C, 8, replace=False) + 1
        neg = np.setdiff1d(neg, present)
        nel = present[:1] if rng.random() < 0.1 else present[:0]
        images.append(
            {
                "id": im + 1,
                "width": W,
                "height": H,
                "file_name": f"{im + 1:012d}.jpg",
                "neg_category_ids": [int(c) for c in neg],
                "not_exhaustive_category_ids": [int(c) for c in nel],
            }
        )
        # detections: jittered ground truth, then random boxes of random classes
        k = rng.integers(1, 4, hi - lo)
        src = np.repeat(np.arange(lo, hi), k)[:dets_per_image]
        box = np.concatenate([xy[src], wh[src]], axis=1)
        box[:, :2] += rng.normal(0, 0.08, (len(src), 2)) * box[:, 2:]
        box[:, 2:] *= np.exp(rng.normal(0, 0.1, (len(src), 2)))
        lab = np.where(rng.random(len(src)) < 0.7, labels[src], rng.choice(C, len(src), p=p) + 1)
        n_rand = dets_per_image - len(src)
        rwh = np.exp(rng.uniform(np.log(8), np.log(300), (n_rand, 2)))
        rxy = rng.uniform(0, 1, (n_rand, 2)) * (np.array([W, H]) - rwh).clip(1, None)
        pool = np.concatenate([present, neg, rng.choice(C, 4) + 1])
        rlab = rng.choice(pool, n_rand)
        d = np.zeros((dets_per_image, 7))
        d[:, 0] = im + 1
        d[:, 1:5] = np.concatenate([box, np.concatenate([rxy, rwh], axis=1)])
        d[:, 5] = np.round(rng.random(dets_per_image), 4)  # some ties, as real scores have
        d[:, 6] = np.concatenate([lab, rlab])
        rows.append(d)
    gt = {"images": images, "annotations": anns, "categories": cats}
    return gt, np.concatenate(rows)


def as_dicts(arr):
    return [
        {
            "image_id": int(r[0]),
            "category_id": int(r[6]),
            "bbox": [float(r[1]), float(r[2]), float(r[3]), float(r[4])],
            "score": float(r[5]),
        }
        for r in arr
    ]


def reference_lvis_api(gt, dets):
    from lvis import LVIS, LVISEval, LVISResults

    from fasa_seesaw.evaluation import lvis_numpy2_compat

    lvis_gt = LVIS.__new__(LVIS)
    lvis_gt.logger = logging.getLogger("lvis")
    lvis_gt.dataset = gt
    lvis_gt._create_index()
    with lvis_numpy2_compat():
        ev = LVISEval(lvis_gt, LVISResults(lvis_gt, dets, max_dets=300), "bbox")
        ev.run()
    p = ev.eval["precision"][:, :, :, 0]
    per_cat = np.array(
        [
            p[:, :, k][p[:, :, k] > -1].mean() * 100 if (p[:, :, k] > -1).any() else np.nan
            for k in range(p.shape[2])
        ]
    )
    return {k: (np.nan if v == -1 else v * 100) for k, v in ev.results.items()}, per_cat


def peak_rss_mib():
    """Peak resident set size of this process (VmHWM; ru_maxrss would carry over the parent's
    peak across fork + exec on Linux)."""
    try:
        kb = _hwm_kb()
    except OSError:
        kb = 0
    return (kb or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024.0


def part_speed(args, out):
    from fasa_seesaw.evaluation import evaluate_lvis

    t0 = time.perf_counter()
    gt, arr = make_dataset(args.images, args.gt_per_image, args.dets, args.seed)
    dicts = as_dicts(arr)
    print(
        f"\n## speed: {args.images} images, {len(gt['annotations'])} GT boxes, {len(arr)} "
        f"detections ({args.dets}/image), 1203 categories, bbox (built in "
        f"{time.perf_counter() - t0:.0f} s)\n",
        flush=True,
    )
    times, metrics = {}, {}
    t0 = time.perf_counter()
    o = evaluate_lvis(gt, arr, "bbox", "hotcoco")
    times["ours/array"] = time.perf_counter() - t0
    metrics["ours/array"] = (o.metrics, o.per_category_ap)
    print(f"ours/array  {times['ours/array']:8.1f} s", flush=True)
    t0 = time.perf_counter()
    o = evaluate_lvis(gt, dicts, "bbox", "hotcoco")
    times["ours/dict"] = time.perf_counter() - t0
    metrics["ours/dict"] = (o.metrics, o.per_category_ap)
    print(f"ours/dict   {times['ours/dict']:8.1f} s", flush=True)
    if not args.skip_reference:
        t0 = time.perf_counter()
        metrics["reference"] = reference_lvis_api(copy.deepcopy(gt), copy.deepcopy(dicts))
        times["reference"] = time.perf_counter() - t0
        print(f"reference   {times['reference']:8.1f} s  (lvis-api)", flush=True)
        ref_m, ref_cat = metrics["reference"]
        worst = 0.0
        for name in ("ours/array", "ours/dict"):
            m, cat = metrics[name]
            assert sorted(m) == sorted(ref_m), (sorted(m), sorted(ref_m))
            for k in ref_m:
                if np.isnan(ref_m[k]):
                    assert np.isnan(m[k]), k
                else:
                    worst = max(worst, abs(m[k] - ref_m[k]))
            assert np.array_equal(np.isnan(cat), np.isnan(ref_cat))
            ok = ~np.isnan(cat)
            worst = max(worst, float(np.abs(cat[ok] - ref_cat[ok]).max()))
        assert worst <= 1e-6, f"engines disagree by {worst}"
        print(
            f"\nmetrics identical: largest difference {worst:.2e} over every metric and "
            f"every per-category AP"
        )
        for name in ("ours/array", "ours/dict"):
            print(f"speed-up {name}: {times['reference'] / times[name]:.1f}x")
    m = metrics["ours/array"][0]
    print("\n" + "  ".join(f"{k} {m[k]:.2f}" for k in ("AP", "AP50", "APr", "APc", "APf")))
    out["speed"] = {
        "images": args.images,
        "detections": int(len(arr)),
        "gt_boxes": len(gt["annotations"]),
        "seconds": times,
        "metrics": {k: (None if np.isnan(v) else v) for k, v in m.items()},
    }


def part_memory(args, out):
    res = {}
    for mode in ("array", "dict"):
        cmd = [
            sys.executable,
            __file__,
            "--_memory-worker",
            mode,
            "--memory-images",
            str(args.memory_images),
            "--dets",
            str(args.dets),
            "--gt-per-image",
            str(args.gt_per_image),
            "--seed",
            str(args.seed),
        ]
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in p.stdout.splitlines() if x.startswith("MEMJSON ")]
        if p.returncode != 0 or not line:
            raise RuntimeError(f"memory worker {mode} failed:\n{p.stderr[-3000:]}")
        res[mode] = json.loads(line[0][8:])
        r = res[mode]
        print(
            f"ours/{mode:5s}: {args.memory_images} images, {r['detections']} detections: peak RSS "
            f"{r['peak_rss_mib'] / 1024:.2f} GiB (after building the data "
            f"{r['rss_before_eval_mib'] / 1024:.2f} GiB), evaluation {r['seconds']:.1f} s, "
            f"AP {r['AP']:.2f}",
            flush=True,
        )
    out["memory"] = res


def memory_worker(args):
    from fasa_seesaw.evaluation import evaluate_lvis

    gt, arr = make_dataset(args.memory_images, args.gt_per_image, args.dets, args.seed)
    dets = arr if args.memory_worker == "array" else as_dicts(arr)
    del arr
    before = peak_rss_mib()
    t0 = time.perf_counter()
    o = evaluate_lvis(gt, dets, "bbox", "hotcoco")
    dt = time.perf_counter() - t0
    n = len(dets)
    print(
        "MEMJSON "
        + json.dumps(
            {
                "detections": n,
                "peak_rss_mib": peak_rss_mib(),
                "rss_before_eval_mib": before,
                "seconds": dt,
                "AP": o.metrics["AP"],
            }
        )
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="all", choices=["speed", "memory", "all"])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--memory-images", type=int, default=20000)
    ap.add_argument("--dets", type=int, default=300)
    ap.add_argument("--gt-per-image", type=float, default=12.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-reference", action="store_true", help="time only ours")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    ap.add_argument("--_memory-worker", dest="memory_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.getLogger("lvis").setLevel(logging.ERROR)
    if args.memory_worker:
        return memory_worker(args)
    import hotcoco
    import lvis

    print(
        f"bench_lvis_eval: python {platform.python_version()}, hotcoco {hotcoco.__version__}, "
        f"lvis {getattr(lvis, '__version__', '0.5.3')}, numpy {np.__version__}, "
        f"{os.cpu_count()} CPUs ({platform.machine()})"
    )
    out = {"args": vars(args)}
    if args.part in ("speed", "all"):
        part_speed(args, out)
    if args.part in ("memory", "all"):
        part_memory(args, out)
    if args.json:
        write_json(args.json, out)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
