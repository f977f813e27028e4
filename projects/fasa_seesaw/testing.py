# Copyright (c) fasa_seesaw contributors.
"""
Small inputs for tests and examples (as ``detectron2.utils.testing``): an LVIS-format ground
truth whose AP is known and detections on it, a random LVIS case with the federated corner cases
and the official lvis-api's answer to it, and a tiny Seesaw + FASA box predictor.
"""

import copy
import json
import numpy as np
import os
import tempfile
import pycocotools.mask as mask_util
import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform

__all__ = [
    "SMOKE_OPTS",
    "TOY_COUNTS",
    "detections_on_gt",
    "lvis_api_reference",
    "random_lvis_case",
    "toy_fasa_seesaw_predictor",
    "toy_lvis_gt",
    "toy_proposals",
]


def checkpoint_model(path):
    """The model state dict of a checkpoint file (as DetectionCheckpointer saves it)."""
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def toy_lvis_gt():
    """Three images, one box each, of three classes (frequent, common, rare); each image lists
    the other two classes as verified negatives."""
    cats = [
        {"id": 1, "name": "a", "frequency": "f", "image_count": 200, "synset": "a.n.01"},
        {"id": 2, "name": "b", "frequency": "c", "image_count": 50, "synset": "b.n.01"},
        {"id": 3, "name": "c", "frequency": "r", "image_count": 3, "synset": "c.n.01"},
    ]
    images, anns = [], []
    boxes = {1: [(10, 10, 20, 20)], 2: [(40, 40, 15, 25)], 3: [(5, 50, 30, 10)]}
    for img_id in (1, 2, 3):
        images.append(
            {
                "id": img_id,
                "height": 100,
                "width": 100,
                "neg_category_ids": [c for c in (1, 2, 3) if c != img_id],
                "not_exhaustive_category_ids": [],
            }
        )
        for x, y, w, h in boxes[img_id]:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": img_id,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                    "iscrowd": 0,
                }
            )
    return {"images": images, "annotations": anns, "categories": cats}


def detections_on_gt(gt, score, skip_category=None):
    """One detection per ground-truth box, on it exactly."""
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": score,
        }
        for a in gt["annotations"]
        if a["category_id"] != skip_category
    ]


# Config options that point a quickstart config at the built-in smoke dataset (12 classes) at
# 64 px.
SMOKE_OPTS = [
    "DATASETS.TRAIN", "('longtail_synth_smoke_train',)",
    "DATASETS.TEST", "('longtail_synth_smoke_val',)",
    "MODEL.ROI_HEADS.NUM_CLASSES", "12",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
]  # fmt: skip

# Training instance counts of the toy predictor's six classes.
TOY_COUNTS = [300, 120, 40, 12, 3, 1]


def toy_fasa_seesaw_predictor(feature_dim: int = 8, counts=TOY_COUNTS, cls=None, **fasa):
    """Seesaw + cosine classifier + FASA on ``len(counts)`` classes with those instance counts,
    built after ``torch.manual_seed(0)``. By default warm-up 100 (bank statistics only); ``fasa``
    overrides any FASA argument, ``cls`` the predictor class (default the Seesaw alias)."""
    from .modeling import FASA, SeesawFastRCNNOutputLayers, SeesawLoss

    C, D = len(counts), feature_dim
    fasa_args = dict(
        loss_weight=0.1,
        samples_per_class=1,
        clamp_min_zero=False,
        warmup_iters=100,  # statistics only: the draws would differ between setups
        bank_mode="ema",
        bank_momentum=0.1,
        sync_bank=True,
        init_probs="inverse_frequency",
        instance_counts=lambda: counts,
        epoch_iters=lambda: 100,
    )
    fasa_args.update(fasa)
    torch.manual_seed(0)
    return (cls or SeesawFastRCNNOutputLayers)(
        ShapeSpec(channels=D),
        box2box_transform=Box2BoxTransform(weights=(10, 10, 5, 5)),
        num_classes=C,
        cls_loss=SeesawLoss(C),
        normed_classifier=True,
        fasa=FASA(C, D, **fasa_args),
    )


def toy_proposals(gt):
    """One 64 x 64 image's training proposals with ground-truth classes ``gt``: the same box
    for every RoI, its ground-truth box one pixel off (for a predictor's ``losses``)."""
    from detectron2.structures import Boxes, Instances

    inst = Instances((64, 64))
    boxes = torch.tensor([[4.0, 4.0, 30.0, 30.0]]).repeat(len(gt), 1)
    inst.proposal_boxes = Boxes(boxes)
    inst.gt_boxes = Boxes(boxes + 1)
    inst.gt_classes = torch.tensor(gt)
    return [inst]


W, H = 160, 120  # the image size of random_lvis_case


def toy_detection_batch(n_images=2, size=64, seed=0, num_classes=30, min_side=10.0):
    """
    A detectron2 training batch of random square images, each with 3 random boxes (sides
    ``min_side`` to ``min_side`` + 15) of random classes and box-shaped polygon masks.
    """
    from detectron2.structures import Boxes, Instances, PolygonMasks

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_images):
        xy = torch.rand(3, 2, generator=g) * 30
        boxes = torch.cat([xy, xy + min_side + torch.rand(3, 2, generator=g) * 15], dim=1)
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(0, num_classes, (3,), generator=g)
        inst.gt_masks = PolygonMasks(
            [[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in boxes.tolist()]
        )
        image = torch.randint(0, 255, (3, size, size), generator=g).float()
        out.append({"image": image, "instances": inst, "height": size, "width": size})
    return out


def _poly(x, y, w, h):
    return [x + w / 2, y, x + w, y + h / 3, x + w, y + 2 * h / 3, x + w / 2, y + h, x, y + h / 2]


def _rle(poly):
    rle = mask_util.merge(mask_util.frPyObjects([poly], H, W))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def random_lvis_case(seed, num_images=8, big_image_dets=340, ties=True):
    """
    A small LVIS-format ground truth and detections with the federated corner cases: images with
    neg_category_ids and not_exhaustive_category_ids, an image without ground truth but with a
    negative list (its detections are false positives), an image without ground truth or lists
    (its detections are not evaluated), a category without ground truth, one image with more
    than 300 detections, tied scores. Detections carry both bbox and an RLE segmentation.
    """
    rng = np.random.default_rng(seed)
    freqs = ["r", "c", "f", "r", "c", "f", "c", "r"]
    cats = [{"id": i + 1, "name": f"cat{i + 1}", "frequency": f} for i, f in enumerate(freqs)]
    images, anns, gts = [], [], {}
    aid = 1
    for im in range(1, num_images + 1):
        boxes = []
        if im < num_images - 1:
            for _ in range(int(rng.integers(2, 6))):
                c = int(rng.choice([1, 2, 3, 5, 6, 8]))
                w, h = float(rng.uniform(8, 100)), float(rng.uniform(8, 90))
                x, y = float(rng.uniform(0, W - w)), float(rng.uniform(0, H - h))
                poly = _poly(x, y, w, h)
                area = float(mask_util.area(_rle(poly)))
                anns.append(
                    {
                        "id": aid,
                        "image_id": im,
                        "category_id": c,
                        "bbox": [x, y, w, h],
                        "area": area,
                        "segmentation": [poly],
                        "iscrowd": 0,
                    }
                )
                boxes.append((c, [x, y, w, h]))
                aid += 1
        present = sorted({c for c, _ in boxes})
        others = [c for c in range(1, 9) if c not in present]
        neg = sorted(int(c) for c in rng.choice(others, size=2, replace=False))
        images.append(
            {
                "id": im,
                "width": W,
                "height": H,
                "file_name": f"{im}.jpg",
                "neg_category_ids": neg,
                "not_exhaustive_category_ids": present[:1],
            }
        )
        gts[im] = boxes
    images[num_images - 2]["neg_category_ids"] = [1, 4]  # no GT; category 4 never has GT
    images[num_images - 1]["neg_category_ids"] = []  # no GT, no lists: detections not evaluated
    gt = {"images": images, "annotations": anns, "categories": cats}

    dets = []
    decimals = 1 if ties else 6

    def add(im, c, box, score):
        x, y, w, h = box
        x, y = min(max(x, 0.0), W - 2), min(max(y, 0.0), H - 2)
        w, h = max(2.0, min(w, W - x)), max(2.0, min(h, H - y))
        dets.append(
            {
                "image_id": im,
                "category_id": c,
                "bbox": [x, y, w, h],
                "score": float(np.round(score, decimals)),
                "segmentation": _rle(_poly(x, y, w, h)),
            }
        )

    for im in range(1, num_images + 1):
        for c, b in gts[im]:
            for _ in range(int(rng.integers(1, 4))):
                j = rng.normal(0, 4, 4)
                cc = c if rng.random() < 0.8 else int(rng.integers(1, 9))
                add(
                    im,
                    cc,
                    [b[0] + j[0], b[1] + j[1], b[2] + j[2], b[3] + j[3]],
                    rng.uniform(0.1, 1),
                )
        for _ in range(big_image_dets if im == 1 else int(rng.integers(3, 10))):
            w, h = float(rng.uniform(5, 60)), float(rng.uniform(5, 60))
            box = [float(rng.uniform(0, W - w)), float(rng.uniform(0, H - h)), w, h]
            add(im, int(rng.integers(1, 9)), box, rng.uniform(0.01, 0.9))
    dets = [dets[i] for i in rng.permutation(len(dets))]
    return gt, dets


def lvis_api_reference(gt, dets, iou_type, max_dets=300):
    """(metrics in %, per-category AP in %, the LVISEval) from the official lvis-api, used the
    way detectron2 uses it (segm results without bbox)."""
    from lvis import LVIS, LVISEval, LVISResults

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "gt.json")
        with open(path, "w") as f:
            json.dump(gt, f)
        lvis_gt = LVIS(path)
    res = copy.deepcopy(dets)
    if iou_type == "segm":
        for r in res:
            r.pop("bbox", None)
    else:
        for r in res:
            r.pop("segmentation", None)
    from .evaluation import lvis_numpy2_compat

    with lvis_numpy2_compat():
        ev = LVISEval(lvis_gt, LVISResults(lvis_gt, res, max_dets=max_dets), iou_type)
        ev.run()
    precision = ev.eval["precision"][:, :, :, 0]
    per_cat = []
    for k in range(precision.shape[2]):
        p = precision[:, :, k]
        per_cat.append(p[p > -1].mean() * 100 if (p > -1).any() else np.nan)
    metrics = {k: (np.nan if v == -1 else v * 100) for k, v in ev.results.items()}
    return metrics, np.array(per_cat), ev


def spawn_gloo(fn, args, nprocs, init_file, attempts=2):
    """``torch.multiprocessing.spawn(fn, args, nprocs)`` for tests whose workers join a gloo group
    through ``init_file`` (passed as ``args[1]``). Gloo's loopback connection set-up can fail
    transiently ("connectFullMesh failed ... Connection closed by peer"): such a failure is
    retried with a fresh init file, any other error is raised at once."""
    import torch.multiprocessing as mp

    for attempt in range(attempts):
        path = f"{init_file}.{attempt}"
        try:
            return mp.spawn(fn, args=(args[0], path) + tuple(args[2:]), nprocs=nprocs)
        except Exception as e:  # noqa: B902 (re-raised unless it is gloo's set-up)
            if "connectFullMesh" not in str(e) or attempt == attempts - 1:
                raise
