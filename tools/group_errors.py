#!/usr/bin/env python
# Copyright (c) fasa_seesaw contributors.
"""
Where each frequency group's detections go: for a run's detections of rare, common and frequent
classes, how many are true positives and how many land on another class's object or on
background. It answers "does a method raise a group's scores where that group is absent?", e.g.
why a model finds as many rare objects as another but has a lower APr.

Only detections that LVIS evaluation counts are typed: the image must have verified the
detection's class (a positive, or in neg_category_ids), and a detection that matches nothing of
a class in the image's not_exhaustive_category_ids is ignored, as LVIS ignores it. As in LVIS AP,
at most 300 detections per image (highest scores) are kept; only those with score >= --score
are typed. Each is typed
at IoU 0.5 against the ground truth of every class, in order of score per image:

  tp     matches an unmatched ground truth of its class (IoU >= 0.5);
  cls    overlaps a ground truth of another class (IoU >= 0.5): a confusion;
  bkg    overlaps no ground truth (IoU < 0.1 with all): a detection on background, or on an
         object of a class the image does not label (LVIS labels some classes per image);
  other  the rest (a poor box, or a duplicate of an object already found).

"gt" is the group's number of ground-truth objects, so tp / gt is its recall at that score.

Examples:
    python tools/group_errors.py --dataset longtail_synth_study_val \\
        output/study_ft/runs/seesaw/seed0 output/study_ft/runs/fasa_seesaw/seed0
    python tools/group_errors.py --dataset longtail_synth_study_val --study output/study_ft \\
        --configs ce fasa seesaw fasa_seesaw --md docs/study/group_errors.md
"""

import argparse
import glob
import json
import numpy as np
import os
import sys
from collections import OrderedDict, defaultdict

GROUPS = ("r", "c", "f")
TYPES = ("tp", "cls", "bkg", "other")
RESULTS = "lvis_instances_results.json"


class ToolError(Exception):
    """Bad input; printed as one line."""


def _iou_xywh(box, boxes):
    """IoU of one [x, y, w, h] box with each row of ``boxes`` (N, 4)."""
    if len(boxes) == 0:
        return np.zeros(0)
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[0] + box[2], boxes[:, 0] + boxes[:, 2])
    y2 = np.minimum(box[1] + box[3], boxes[:, 1] + boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = box[2] * box[3] + boxes[:, 2] * boxes[:, 3] - inter
    return inter / np.maximum(union, 1e-12)


def group_errors(gt: dict, dets, score: float = 0.3, max_dets: int = 300) -> dict:
    """
    Returns {group: {"n": typed detections, "tp", "cls", "bkg", "other", "gt": ground truths}}
    for the groups "r", "c", "f" (see the module docstring for the rules).
    """
    freq = {c["id"]: c.get("frequency") for c in gt["categories"]}
    if any(f not in GROUPS for f in freq.values()):
        raise ToolError("every category needs a 'frequency' of 'r', 'c' or 'f' (LVIS v1 style)")
    out = {g: dict.fromkeys(("n",) + TYPES + ("gt",), 0) for g in GROUPS}
    gts = defaultdict(list)
    for a in gt["annotations"]:
        if a["category_id"] not in freq:
            raise ToolError(
                f"annotation {a.get('id')} has category_id {a['category_id']}, "
                "not among the categories"
            )
        gts[a["image_id"]].append(a)
        out[freq[a["category_id"]]]["gt"] += 1
    verified = {
        im["id"]: {a["category_id"] for a in gts[im["id"]]} | set(im.get("neg_category_ids", []))
        for im in gt["images"]
    }
    not_exhaustive = {
        im["id"]: set(im.get("not_exhaustive_category_ids", [])) for im in gt["images"]
    }
    from fasa_seesaw.evaluation.caps import cap_per_image

    by_image = defaultdict(list)
    for d in cap_per_image(dets, max_dets):  # lvis-api's per-image cap, before any filter
        if d["category_id"] not in freq:
            raise ToolError(
                f"a detection has category_id {d['category_id']}, not in the ground truth"
            )
        by_image[d["image_id"]].append(d)
    for image_id, image_dets in by_image.items():
        image_dets = sorted(image_dets, key=lambda d: -d["score"])  # matched in score order
        anns = gts.get(image_id, [])
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        classes = np.array([a["category_id"] for a in anns], dtype=np.int64)
        matched = np.zeros(len(anns), dtype=bool)
        for d in image_dets:
            if d["score"] < score or d["category_id"] not in verified.get(image_id, ()):
                continue
            row = out[freq[d["category_id"]]]
            ious = _iou_xywh(np.asarray(d["bbox"], dtype=np.float64), boxes)
            same = (classes == d["category_id"]) & ~matched & (ious >= 0.5)
            if same.any():
                j = np.flatnonzero(same)[ious[same].argmax()]
                matched[j] = True
                row["n"] += 1
                row["tp"] += 1
                continue
            if d["category_id"] in not_exhaustive.get(image_id, ()):
                continue  # LVIS ignores it: the image may hold unlabelled objects of the class
            row["n"] += 1
            if ((classes != d["category_id"]) & (ious >= 0.5)).any():
                row["cls"] += 1
            elif len(ious) == 0 or ious.max() < 0.1:
                row["bkg"] += 1
            else:
                row["other"] += 1
    return out


def _results_path(run_dir, dataset):
    path = os.path.join(run_dir, "inference", dataset, RESULTS)
    if not os.path.isfile(path):
        raise ToolError(
            f"{path} does not exist: is {run_dir} a train_net.py OUTPUT_DIR evaluated on "
            f"{dataset}? (--dataset names the inference folder)"
        )
    return path


def _gt_json(dataset, gt_path):
    if gt_path:
        return gt_path
    from detectron2.data import MetadataCatalog

    import fasa_seesaw.data  # noqa: F401  (registers the built-in datasets)

    path = getattr(MetadataCatalog.get(dataset), "json_file", None)
    if not path:
        raise ToolError(f"dataset {dataset!r} is not registered; give its json with --gt")
    if not os.path.isfile(path):
        raise ToolError(
            f"{path}, the json of {dataset!r}, does not exist here: run from the folder the "
            "datasets were built in (DETECTRON2_DATASETS), or give the json with --gt"
        )
    return path


def format_md(rows, score):
    """rows: [(label, {group: counts})] -> a markdown table."""
    head = ["run"]
    for g in GROUPS:
        head += [f"{g}: dets", f"{g}: tp", f"{g}: cls", f"{g}: bkg"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]
    for label, res in rows:
        cells = [label]
        for g in GROUPS:
            r = res[g]
            cells += [
                f"{r['n']:.0f}",
                f"{r['tp']:.0f} / {r['gt']:.0f}",
                f"{r['cls']:.0f}",
                f"{r['bkg']:.0f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Detections LVIS counts (class verified in the image) with score >= {score}, at most 300 "
        "per image; tp / gt is the group's recall at that score, cls a detection on another "
        "class's object, bkg a detection on no labelled object."
    )
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("runs", nargs="*", help="run folders (train_net.py OUTPUT_DIRs)")
    ap.add_argument("--study", help="a longtail_study.py --out folder: runs/<config>/seed<k>")
    ap.add_argument("--configs", nargs="*", help="with --study: these configs (default: all)")
    ap.add_argument("--dataset", required=True, help="the evaluated dataset (inference folder)")
    ap.add_argument("--gt", help="its LVIS-format json (default: the registered dataset's)")
    ap.add_argument(
        "--score", type=float, default=0.3, help="type detections at this score or more"
    )
    ap.add_argument("--md", help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    try:
        runs = OrderedDict()
        for run in args.runs:
            runs[run.rstrip("/")] = [run]
        if args.study:
            configs = args.configs or sorted(
                os.path.basename(p) for p in glob.glob(os.path.join(args.study, "runs", "*"))
            )
            for config in configs:
                seeds = [  # finished runs: those with the dataset's results
                    d
                    for d in sorted(glob.glob(os.path.join(args.study, "runs", config, "seed*")))
                    if os.path.isfile(os.path.join(d, "inference", args.dataset, RESULTS))
                ]
                if not seeds:
                    raise ToolError(
                        f"no run of config {config!r} under {args.study}/runs has results on "
                        f"{args.dataset}"
                    )
                runs[f"{config} ({len(seeds)} seeds, mean)"] = seeds
        if not runs:
            raise ToolError("give run folders or --study")
        gt_path = _gt_json(args.dataset, args.gt)
        with open(gt_path) as f:
            gt = json.load(f)
        rows = []
        for label, folders in runs.items():
            per_seed = []
            for folder in folders:
                with open(_results_path(folder, args.dataset)) as f:
                    per_seed.append(group_errors(gt, json.load(f), args.score))
            mean = {
                g: {k: float(np.mean([r[g][k] for r in per_seed])) for k in per_seed[0][g]}
                for g in GROUPS
            }
            rows.append((label, mean))
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = format_md(rows, args.score)
    print(text, end="")
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"Command: `python tools/group_errors.py {' '.join(argv or sys.argv[1:])}`\n\n")
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
