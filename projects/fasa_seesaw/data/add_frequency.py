# Copyright (c) fasa_seesaw contributors.
"""Adds the LVIS fields that long-tail training and evaluation need to an LVIS/COCO-style json.

Usage::

    python -m fasa_seesaw.data.add_frequency train.json train_fixed.json
    python -m fasa_seesaw.data.add_frequency val.json val_fixed.json --counts-from train.json

LVIS groups classes by the number of TRAINING images that contain them (r: <= 10, c: 11-100,
f: > 100); APr/APc/APf and repeat-factor sampling depend on that "frequency" field. This tool
computes "image_count"/"instance_count" from the annotations where absent (from --counts-from
for a val/test json, since groups must come from training counts), derives "frequency", adds
empty "neg_category_ids"/"not_exhaustive_category_ids" where missing, and optionally renumbers
category ids to 1..K.
"""

import argparse
import json
import logging
import numpy as np
import os
import sys
from typing import Dict, Optional, Sequence

from .counts import lvis_frequency

logger = logging.getLogger(__name__)

__all__ = ["count_categories", "add_frequency", "main"]


def count_categories(data: dict) -> Dict[int, Dict[str, int]]:
    """Returns {category id: {"image_count", "instance_count"}} recomputed from the annotations."""
    cat_ids = np.array([c["id"] for c in data["categories"]], dtype=np.int64)
    ann_cat = np.array([a["category_id"] for a in data["annotations"]], dtype=np.int64)
    ann_img = np.array([a["image_id"] for a in data["annotations"]], dtype=np.int64)
    # Index categories densely; annotations of unknown categories are ignored.
    lookup = {int(c): i for i, c in enumerate(cat_ids)}
    idx = np.array([lookup.get(int(c), -1) for c in ann_cat], dtype=np.int64)
    keep = idx >= 0
    idx, ann_img = idx[keep], ann_img[keep]
    instances = np.bincount(idx, minlength=len(cat_ids))
    pairs = np.unique(np.stack([ann_img, idx], axis=1), axis=0) if len(idx) else np.zeros((0, 2))
    images = np.bincount(pairs[:, 1].astype(np.int64), minlength=len(cat_ids))
    return {
        int(c): {"image_count": int(images[i]), "instance_count": int(instances[i])}
        for i, c in enumerate(cat_ids)
    }


def _remap_ids(data: dict) -> None:
    """Renumbers category ids to 1..K (in old id order) everywhere they appear."""
    old_ids = sorted(c["id"] for c in data["categories"])
    mapping = {old: new for new, old in enumerate(old_ids, start=1)}
    for c in data["categories"]:
        c["id"] = mapping[c["id"]]
    data["categories"].sort(key=lambda c: c["id"])
    for a in data["annotations"]:
        a["category_id"] = mapping[a["category_id"]]
    for img in data["images"]:
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if key in img:
                img[key] = [mapping[c] for c in img[key] if c in mapping]


def add_frequency(
    data: dict,
    counts_from: Optional[dict] = None,
    recompute: bool = False,
    remap_ids: bool = False,
) -> dict:
    """Fills image_count/instance_count/frequency (and LVIS image lists) in place; returns data.

    Args:
        data: the LVIS/COCO-style json dict to fix.
        counts_from: training json whose annotations define the counts (matched by category id,
            before remapping); default: `data` itself, which is right only for a training json.
        recompute: overwrite existing counts and frequencies instead of filling gaps.
        remap_ids: renumber category ids to contiguous 1..K afterwards.
    """
    counts = count_categories(counts_from if counts_from is not None else data)
    for c in data["categories"]:
        if c["id"] not in counts:
            raise ValueError(f"category id {c['id']} is missing from the --counts-from json")
        for key in ("image_count", "instance_count"):
            if recompute or key not in c:
                c[key] = counts[c["id"]][key]
        if recompute or "frequency" not in c:
            c["frequency"] = str(lvis_frequency(c["image_count"]))
    missing = 0
    for img in data["images"]:
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if key not in img:
                img[key] = []
                missing += 1
    if missing:
        logger.warning(
            "Added %d empty neg_category_ids/not_exhaustive_category_ids lists; with empty "
            "negative lists the LVIS evaluator ignores detections of classes absent from an image",
            missing,
        )
    if remap_ids:
        _remap_ids(data)
    return data


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        description="Add LVIS 'frequency' (and counts) to a LVIS/COCO-style json."
    )
    parser.add_argument("input", help="input json")
    parser.add_argument("output", help="output json (refused if it exists, unless --force)")
    parser.add_argument("--counts-from", help="training json to count images from (for val)")
    parser.add_argument("--recompute", action="store_true", help="overwrite existing fields")
    parser.add_argument("--remap-ids", action="store_true", help="renumber categories to 1..K")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if os.path.exists(args.output) and not args.force:
        print(f"error: {args.output} exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    with open(args.input, encoding="utf-8") as f:
        data = json.load(f)
    counts_from = None
    if args.counts_from:
        with open(args.counts_from, encoding="utf-8") as f:
            counts_from = json.load(f)
    add_frequency(data, counts_from, recompute=args.recompute, remap_ids=args.remap_ids)
    groups = [c["frequency"] for c in data["categories"]]
    logger.info(
        "r/c/f = %d/%d/%d; writing %s",
        groups.count("r"),
        groups.count("c"),
        groups.count("f"),
        args.output,
    )
    # Write next to the output and rename, so an interrupted run never leaves a truncated file.
    tmp = f"{args.output}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
