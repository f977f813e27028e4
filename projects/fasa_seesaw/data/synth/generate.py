# Copyright (c) fasa_seesaw contributors.
"""Generating a synthetic dataset: class-to-image assignment, splits, json, the on-disk cache."""

import argparse
import json
import logging
import math
import numpy as np
import os
import shutil
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple
import cv2

from ..counts import lvis_frequency
from .render import UNIT_SHAPES, polygon_record, render_image
from .spec import (
    COLOURS,
    GENERATOR_VERSION,
    SPECS,
    SPLIT_STREAMS,
    SynthSpec,
    dataset_paths,
    default_root,
    spec_categories,
    spec_rng,
    spec_splits,
    split_size,
)

logger = logging.getLogger(__name__)

_MULTI_THREE_PROB = 0.3  # among multi-instance pairs, probability of 3 instead of 2 instances

# ---------------------------------------------------------------------------------------------
# Image-level assignment of classes
# ---------------------------------------------------------------------------------------------


def _eval_targets(spec: SynthSpec, train_targets: np.ndarray, num_images: int) -> np.ndarray:
    """Val (or test) image counts per class: proportional to sqrt(train count), at least the
    minimum.

    A flatter distribution than train keeps the benchmark long-tailed in training while giving
    every rare class enough evaluation images for APr to mean something. The scale keeps the
    density (annotated classes per image) of the training split.
    """
    density = train_targets.sum() / spec.num_train_images
    root = np.sqrt(train_targets.astype(np.float64))
    scaled = np.floor(root * density * num_images / root.sum() + 0.5).astype(np.int64)
    return np.clip(scaled, spec.val_min_images_per_class, num_images)


def _assign_pairs(
    rng: np.random.Generator, targets: np.ndarray, num_images: int, capacity: int, split: str
) -> np.ndarray:
    """Places class k into exactly targets[k] distinct images, at most `capacity` per image.

    Returns:
        np.ndarray: bool [num_images, K] presence matrix; every image has at least one class.
    """
    k_total = int(targets.sum())
    if not num_images <= k_total <= num_images * capacity or targets.max() > num_images:
        raise ValueError(
            f"{split}: cannot place {k_total} (class, image) pairs (max {targets.max()} per class) "
            f"into {num_images} images with <= {capacity} objects each; adjust the SynthSpec"
        )
    presence = np.zeros((num_images, len(targets)), dtype=bool)
    counts = np.zeros(num_images, dtype=np.int64)
    # Largest classes first, images with more free slots preferred: keeps the load balanced.
    for k in np.argsort(-targets, kind="stable"):
        avail = np.flatnonzero(counts < capacity)
        if len(avail) < targets[k]:
            raise ValueError(f"{split}: ran out of image capacity; raise max_objects_per_image")
        weight = (capacity - counts[avail]).astype(np.float64) ** 2
        chosen = rng.choice(avail, size=int(targets[k]), replace=False, p=weight / weight.sum())
        presence[chosen, k] = True
        counts[chosen] += 1
    # Every image needs an object: move a pair from a crowded image (keeps per-class counts).
    for empty in np.flatnonzero(counts == 0):
        donor = rng.choice(np.flatnonzero(counts == counts.max()))
        k = rng.choice(np.flatnonzero(presence[donor]))
        presence[donor, k], presence[empty, k] = False, True
        counts[donor] -= 1
        counts[empty] += 1
    return presence


def _generate_split(
    spec: SynthSpec,
    split: str,
    categories: List[dict],
    targets: np.ndarray,
    out_dir: str,
) -> Tuple[List[dict], List[dict], np.ndarray, np.ndarray]:
    """Draws and writes one split's PNGs.

    Returns:
        (images, annotations, image_count[K], instance_count[K]) with counts measured on the
        written annotations.
    """
    stream = SPLIT_STREAMS[split]
    num_images = split_size(spec, split)
    num_classes = len(categories)
    rng = spec_rng(spec, stream)
    presence = _assign_pairs(rng, targets, num_images, spec.max_objects_per_image, split)

    # Per (image, class) instance counts and not-exhaustive flags, drawn for all pairs at once.
    frequent = np.array([c["frequency"] == "f" for c in categories])
    multi = presence & frequent[None, :] & (rng.random(presence.shape) < spec.multi_instance_prob)
    n_annotated = presence.astype(np.int64) + multi * (
        1 + (rng.random(presence.shape) < _MULTI_THREE_PROB)
    )
    not_exhaustive = presence & (rng.random(presence.shape) < spec.not_exhaustive_prob)

    visuals = [
        (
            UNIT_SHAPES[c["shape"]],
            np.array(COLOURS[c["colour"]], dtype=np.int64),
            c["texture"],
        )
        for c in categories
    ]
    img_dir = os.path.join(out_dir, split)
    os.makedirs(img_dir, exist_ok=True)

    images, annotations = [], []
    for i in range(num_images):
        image_id = i + 1
        img_rng = spec_rng(spec, stream, 1 + i)  # per-image stream: images are independent
        classes = np.flatnonzero(presence[i])
        img, placed = render_image(
            img_rng, spec, classes, n_annotated[i, classes], not_exhaustive[i, classes], visuals
        )
        file_name = f"{image_id:06d}.png"
        if not cv2.imwrite(os.path.join(img_dir, file_name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR)):
            raise OSError(f"Failed to write {os.path.join(img_dir, file_name)}")

        drawn = np.zeros(num_classes, dtype=bool)
        ne_ids = set()
        for k, poly, annotated in placed:
            drawn[k] = True
            if not annotated:
                # An instance left unannotated, as LVIS does for non-exhaustive classes.
                ne_ids.add(k + 1)
                continue
            segmentation, area, bbox = polygon_record(poly)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": k + 1,
                    "segmentation": [segmentation],
                    "area": area,
                    "bbox": bbox,
                    "iscrowd": 0,
                }
            )
        absent = np.flatnonzero(~drawn)
        num_neg = int(math.floor(spec.neg_fraction * len(absent) + 0.5))
        neg = (
            np.sort(img_rng.choice(absent, size=num_neg, replace=False)) if num_neg else absent[:0]
        )
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                # detectron2's load_lvis_json derives paths from coco_url ("<split>/<file>");
                # fasa_seesaw's loader uses file_name relative to the split's image root instead.
                "coco_url": f"http://fasa-seesaw.synth/{spec.name}/{split}/{file_name}",
                "flickr_url": "",
                "height": spec.image_size,
                "width": spec.image_size,
                "license": 0,
                "neg_category_ids": [int(c) + 1 for c in neg],
                "not_exhaustive_category_ids": sorted(ne_ids),
            }
        )

    ann_img = np.array([a["image_id"] for a in annotations], dtype=np.int64)
    ann_cat = np.array([a["category_id"] for a in annotations], dtype=np.int64) - 1
    instance_count = np.bincount(ann_cat, minlength=num_classes)
    pairs = np.unique(ann_img * num_classes + ann_cat)
    image_count = np.bincount(pairs % num_classes, minlength=num_classes)
    return images, annotations, image_count, instance_count


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))


def _generate_into(spec: SynthSpec, out_dir: str) -> None:
    """Generates the whole dataset into out_dir (which should be a fresh temporary directory)."""
    start = time.perf_counter()
    categories = spec_categories(spec)
    train_targets = np.array([c["image_count"] for c in categories], dtype=np.int64)
    results = {}
    for split in spec_splits(spec):
        targets = (
            train_targets
            if split == "train"
            else _eval_targets(spec, train_targets, split_size(spec, split))
        )
        results[split] = _generate_split(spec, split, categories, targets, out_dir)

    _, _, image_count, instance_count = results["train"]
    # Exactness is what makes metadata computable from the spec alone (see spec_categories).
    if not np.array_equal(image_count, train_targets):
        bad = np.flatnonzero(image_count != train_targets)[:5] + 1
        raise RuntimeError(f"Train image counts differ from targets for category ids {bad}")
    frequency = lvis_frequency(image_count)
    expected = np.array([c["frequency"] for c in categories])
    assert (frequency == expected).all(), "actual train frequency differs from the source group"

    # All splits carry the TRAIN statistics, as LVIS v1 does: the evaluator's APr/APc/APf
    # groups must be defined by training frequency.
    json_categories = [
        {
            "id": c["id"],
            "name": c["name"],
            "synonyms": c["synonyms"],
            "def": c["def"],
            "synset": c["synset"],
            "frequency": str(frequency[i]),
            "image_count": int(image_count[i]),
            "instance_count": int(instance_count[i]),
        }
        for i, c in enumerate(categories)
    ]
    spec_hash = spec.spec_hash()
    for split in spec_splits(spec):
        images, annotations, _, _ = results[split]
        data = {
            "info": {
                "description": f"fasa_seesaw synthetic long-tailed dataset '{spec.name}' ({split})",
                "version": GENERATOR_VERSION,
                "spec_hash": spec_hash,
                "split": split,
            },
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": json_categories,
        }
        _write_json(os.path.join(out_dir, f"lvis_v1_format_{split}.json"), data)

    # spec.json is written last: its presence with the right hash marks a complete dataset.
    _write_json(
        os.path.join(out_dir, "spec.json"),
        {
            "spec": spec.to_dict(),
            "spec_hash": spec_hash,
            "generator_version": GENERATOR_VERSION,
            "categories": categories,
        },
    )
    logger.info(
        "Generated synthetic dataset '%s' (%d train / %d val / %d test images, %d classes) "
        "in %.1fs",
        spec.name,
        spec.num_train_images,
        spec.num_val_images,
        spec.num_test_images,
        spec.num_classes,
        time.perf_counter() - start,
    )


def _read_hash(directory: str) -> Optional[str]:
    """Returns the spec hash recorded in directory/spec.json, or None if absent/unreadable."""
    try:
        with open(os.path.join(directory, "spec.json"), encoding="utf-8") as f:
            return json.load(f).get("spec_hash")
    except (OSError, ValueError, AttributeError):
        return None


def _is_complete(spec: SynthSpec, root: str) -> bool:
    """True if the dataset folder exists, matches the spec hash and has every split's json."""
    paths = dataset_paths(spec, root)
    return _read_hash(paths["root"]) == spec.spec_hash() and all(
        os.path.isfile(paths[f"{split}_json"]) for split in spec_splits(spec)
    )


def _move_aside(target: str) -> str:
    """Renames an existing dataset folder to <target>.stale-<hash> (never deletes user data)."""
    tag = (_read_hash(target) or "unknown")[:12]
    stale = f"{target}.stale-{tag}"
    suffix = 1
    while os.path.exists(stale):
        stale = f"{target}.stale-{tag}-{suffix}"
        suffix += 1
    os.rename(target, stale)
    logger.warning("Moved outdated dataset folder %s to %s", target, stale)
    return stale


def generate(spec: SynthSpec, root: Optional[str] = None) -> Dict[str, str]:
    """Generates the dataset atomically and returns its paths (see dataset_paths()).

    Everything is written into a temporary sibling directory which is then renamed into place,
    so readers never see a half-written dataset. If another process finished the same spec first,
    its copy is kept. A different or incomplete folder in the way is moved to
    "<name>.stale-<hash>" rather than deleted.
    """
    root = default_root() if root is None else root
    paths = dataset_paths(spec, root)
    target = paths["root"]
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=root)
    os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would make the shared cache private
    try:
        _generate_into(spec, tmp)
        for _ in range(5):
            try:
                os.rename(tmp, target)  # atomic; fails if target is a non-empty directory
                return paths
            except OSError:
                if not os.path.exists(target):
                    raise
            if _is_complete(spec, root):
                logger.info("Dataset %s was generated concurrently; keeping that copy", target)
                return paths
            _move_aside(target)
        raise RuntimeError(f"Could not move the generated dataset into place at {target}")
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_generated(spec: SynthSpec, root: Optional[str] = None) -> Dict[str, str]:
    """Returns the dataset's paths, generating it only if missing or generated from another spec.

    An existing folder whose spec.json hash differs (older generator version or edited spec) is
    moved to "<name>.stale-<hash>" with a warning, then a fresh copy is generated.
    """
    root = default_root() if root is None else root
    paths = dataset_paths(spec, root)
    if _is_complete(spec, root):
        return paths
    if os.path.exists(paths["root"]):
        logger.warning(
            "Dataset folder %s does not match spec '%s' (hash %s, found %s); regenerating and "
            "moving the old folder aside",
            paths["root"],
            spec.name,
            spec.spec_hash()[:12],
            (_read_hash(paths["root"]) or "none")[:12],
        )
    else:
        logger.info("Generating synthetic dataset '%s' under %s", spec.name, root)
    return generate(spec, root)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """CLI: python -m fasa_seesaw.data.synth [--spec quickstart] [--root DIR]."""
    parser = argparse.ArgumentParser(
        description="Generate a built-in synthetic LVIS-format dataset."
    )
    parser.add_argument("--spec", choices=sorted(SPECS), default="quickstart")
    parser.add_argument("--root", default=None, help="data root (default: default_root())")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    paths = ensure_generated(SPECS[args.spec], args.root)
    print(json.dumps(paths, indent=2))


if __name__ == "__main__":
    main()
