#!/usr/bin/env python
# Copyright (c) fasa_seesaw contributors.
"""
Run mmdetection and this project on the same weights and the same images, stage by stage:
the proof that a converted checkpoint computes what the official model computes.

    bash dev/setup_mmdet.sh    # once: mmengine, mmcv 2.1.0 with CPU ops, mmdet 3.3.0
    .venv-mmdet/bin/python tools/mmdet_equality.py --out output/mmdet_equality

For each model (mmdetection's Seesaw Mask R-CNN R50, with the normed mask head, Seesaw Cascade
Mask R-CNN R101, and CE Mask R-CNN R50, the architecture of the FASA release), at LVIS v1 scale
(1203 classes):

1. build mmdetection's config with random weights (BatchNorm statistics calibrated on the
   first image, heads spread so scores are far from uniform), save it as an mmdetection
   checkpoint, convert it with tools/convert_mmdet_checkpoint.py and load the result through
   MODEL.WEIGHTS, as a user would;
2. check that fasa_seesaw.modelzoo.layout (the layout the converter's tests use without
   mmdetection) has exactly the real model's keys and shapes;
3. on each image, resized once by mmdetection's test pipeline and fed to both: the normalised
   input, the FPN features, the proposals, the class probabilities of the same boxes (mmdetection's
   proposals through both box heads, every cascade stage), the final detections and their masks;
4. each framework's own pre-processing of the same file (mmdetection: cv2 bilinear resize;
   detectron2: PIL bilinear), and what that changes in the detections.

Writes <out>/equality.json and <out>/equality.md (the table in docs/model_zoo.md).
"""

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import time
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

ZOO = os.path.join(ROOT, "configs/LVISv1-InstanceSegmentation/mmdet_converted")
MODELS = [
    # name, mmdetection config (under mmdet's .mim/configs), ours, layout (depth, kind)
    (
        "Mask R-CNN R50, Seesaw",
        "seesaw_loss/mask-rcnn_r50_fpn_seesaw-loss_random-ms-2x_lvis-v1.py",
        "mask_rcnn_R_50_FPN_2x_seesaw_random_mmdet.yaml",
        (50, "mask_rcnn", True),
    ),
    (
        "Mask R-CNN R50, Seesaw + normed mask",
        "seesaw_loss/mask-rcnn_r50_fpn_seesaw-loss-normed-mask_random-ms-2x_lvis-v1.py",
        "mask_rcnn_R_50_FPN_2x_seesaw_normed_mask_random_mmdet.yaml",
        (50, "mask_rcnn", True),
    ),
    (
        "Cascade Mask R-CNN R101, Seesaw",
        "seesaw_loss/cascade-mask-rcnn_r101_fpn_seesaw-loss_random-ms-2x_lvis-v1.py",
        "cascade_mask_rcnn_R_101_FPN_2x_seesaw_random_mmdet.yaml",
        (101, "cascade", True),
    ),
    (
        "Mask R-CNN R50, CE (the FASA release's architecture)",
        "lvis/mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1.py",
        "mask_rcnn_R_50_FPN_2x_ce_random_fasa_release.yaml",
        (50, "mask_rcnn", False),
    ),
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("--out", required=True, help="folder for equality.json and equality.md")
    ap.add_argument(
        "--images", type=int, default=3, help="val images per model, plus one crop (default 3)"
    )
    ap.add_argument("--models", nargs="+", type=int, help="indices into the model list")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--report-only", action="store_true", help="rebuild equality.md from <out>/equality.json"
    )
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- mmdetection
def mmdet_model(config_rel):
    import mmdet
    from mmdet.registry import MODELS as MM_MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    register_all_modules()
    init_default_scope("mmdet")
    logging.getLogger("mmengine").setLevel(logging.WARNING)  # init_weights logs every tensor
    path = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", config_rel)
    cfg = Config.fromfile(path)
    cfg.model.backbone.init_cfg = None  # no download: random weights
    model = MM_MODELS.build(cfg.model)
    model.init_weights()
    return model.eval(), cfg


def mmdet_pipeline():
    from mmcv.transforms import Compose

    return Compose(
        [
            dict(type="LoadImageFromFile"),
            dict(type="Resize", scale=(1333, 800), keep_ratio=True),
            dict(
                type="PackDetInputs",
                meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"),
            ),
        ]
    )


@torch.no_grad()
def randomise(model, first_batch, seed):
    """Spread the heads and calibrate BatchNorm on one image, so that activations stay O(1)
    through the backbone and scores are far from uniform."""
    g = torch.Generator().manual_seed(seed)

    def normal_(t, std):
        t.copy_(torch.randn(t.shape, generator=g) * std)

    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
        normal_(bn.bias, 0.1)
        bn.reset_running_stats()
        bn.momentum = None  # cumulative: the statistics of the calibration batch
        bn.train()
    model.extract_feat(first_batch)
    for bn in bns:
        bn.eval()
    normal_(model.rpn_head.rpn_cls.weight, 0.05)
    normal_(model.rpn_head.rpn_cls.bias, 0.5)
    normal_(model.rpn_head.rpn_reg.weight, 0.01)
    heads = model.roi_head.bbox_head
    for head in heads if isinstance(heads, torch.nn.ModuleList) else [heads]:
        normal_(head.fc_cls.weight, 0.05)
        normal_(head.fc_cls.bias, 1.0)
        normal_(head.fc_reg.weight, 0.005)
    masks = model.roi_head.mask_head
    for head in masks if isinstance(masks, torch.nn.ModuleList) else [masks]:
        normal_(head.conv_logits.weight, 0.05)
        normal_(head.conv_logits.bias, 0.5)


def mmdet_classes():
    from mmdet.datasets import LVISV1Dataset

    return list(LVISV1Dataset.METAINFO["classes"])


# ----------------------------------------------------------------------------- detectron2
def our_model(config_name, weights):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from fasa_seesaw import add_fasa_seesaw_config
    from fasa_seesaw.config import merge_config

    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    merge_config(cfg, os.path.join(ZOO, config_name), ["MODEL.DEVICE", "cpu"])
    cfg.MODEL.WEIGHTS = weights
    model = build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    return model.eval(), cfg


def convert(mm, tmp, config_name):
    from convert_mmdet_checkpoint import main as convert_main

    src, dst = os.path.join(tmp, "mmdet.pth"), os.path.join(tmp, "converted.pth")
    for p in (src, dst):
        if os.path.exists(p):
            os.remove(p)
    meta = {"mmdet_version": "3.3.0", "dataset_meta": {"classes": tuple(mmdet_classes())}}
    torch.save({"meta": meta, "state_dict": mm.state_dict()}, src)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = convert_main([src, dst, "--config", os.path.join(ZOO, config_name)])
    if rc != 0:
        raise SystemExit(f"conversion failed:\n{out.getvalue()}")
    return dst, out.getvalue()


def layout_matches(mm, layout):
    from fasa_seesaw.modelzoo import layout as mmdet_layout

    depth, kind, seesaw = layout
    if kind == "cascade":
        spec = mmdet_layout.cascade_mask_rcnn_state(depth, seesaw=seesaw)
    else:
        spec = mmdet_layout.mask_rcnn_state(depth, seesaw=seesaw)
    real = {k: tuple(v.shape) for k, v in mm.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in spec.items()}
    return {
        "missing_from_layout": sorted(set(real) - set(ours)),
        "not_in_mmdet": sorted(set(ours) - set(real)),
        "other_shape": sorted(k for k in set(real) & set(ours) if real[k] != ours[k]),
    }


# ----------------------------------------------------------------------------- comparisons
def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def box_iou(a, b):
    from torchvision.ops import box_iou as iou

    return iou(a.double(), b.double())


def score_ranks(scores):
    """Each entry's place in descending score order (0: the highest)."""
    order = torch.argsort(scores, descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return rank


def nms_offset_iou(a, b, label, max_coordinate, scale):
    """The IoU of two same-class boxes as torchvision's per-class NMS sees it (float32, their
    own coordinates) and as mmcv's batched_nms sees it (float32, both shifted by
    label * (max_coordinate + 1), its trick for running one NMS over all classes)."""
    from torchvision.ops import box_iou as iou

    # back to the resized image, where both frameworks run NMS (mmdetection 3.x with masks)
    a32, b32 = (a.double() * scale).float()[None], (b.double() * scale).float()[None]
    shift = torch.tensor(float(label), dtype=torch.float32) * (
        torch.tensor(float(max_coordinate), dtype=torch.float32) + 1
    )
    return {
        "iou_float32": float(iou(a32, b32)[0, 0]),
        "iou_float32_mmcv_offset": float(iou(a32 + shift, b32 + shift)[0, 0]),
    }


def compare_detections(mm_inst, our_inst, image_max=None, scale=None):
    """Each mmdetection detection against our detection of the same class with the highest IoU."""
    mb, ms, ml = mm_inst.bboxes, mm_inst.scores, mm_inst.labels
    ob, os_, ol = our_inst.pred_boxes.tensor, our_inst.scores, our_inst.pred_classes
    n_mm, n_our = len(mb), len(ob)
    if n_mm == 0 or n_our == 0:
        return {"mmdet": n_mm, "ours": n_our, "matched": 0}
    iou = box_iou(mb, ob)
    iou[ml[:, None] != ol[None, :]] = -1
    best, j = iou.max(dim=1)
    same = best > 0.999
    ds = (ms - os_[j]).abs()
    matched = same & (ds < 1e-4)
    loose = best > 0.9
    out = {
        "mmdet": n_mm,
        "ours": n_our,
        "matched": int(matched.sum()),
        "same_class_iou_0.9": int(loose.sum()),
        "mean_score_diff_iou_0.9": float(ds[loose].mean()) if loose.any() else None,
        "max_box_diff_px": (
            float((mb[matched] - ob[j[matched]]).abs().max()) if matched.any() else None
        ),
        "max_score_diff": float(ds[same].max()) if same.any() else None,
    }
    # what the unmatched ones are (rank in mmdetection's score order, and the nearest of ours)
    rank = score_ranks(ms)
    out["unmatched"] = [
        {
            "rank": int(rank[i]),
            "score": float(ms[i]),
            "label": int(ml[i]),
            "best_iou_same_class": float(best[i]),
            "our_lowest_score": float(os_.min()),
            # mmdetection's detections of that class with exactly this score (ties)
            "same_score_same_class": int(((ms == ms[i]) & (ml == ml[i])).sum()),
            **nms_offset_iou(mb[i], ob[j[i]], int(ml[i]), image_max, scale),
        }
        for i in torch.nonzero(~matched).flatten().tolist()[:10]
    ]
    if hasattr(mm_inst, "masks") and our_inst.has("pred_masks") and matched.any():
        mm_masks = mm_inst.masks[matched].bool()
        our_masks = our_inst.pred_masks[j[matched]].bool()
        if our_masks.dim() == 4:
            our_masks = our_masks[:, 0]
        xor = (mm_masks ^ our_masks).flatten(1).sum(1).double()
        union = (mm_masks | our_masks).flatten(1).sum(1).double().clamp(min=1)
        out["mask_pixels_differing"] = int(xor.sum())
        out["mask_pixels_total"] = int(union.sum())
        out["masks_identical"] = int((xor == 0).sum())
        out["max_mask_diff_of_union"] = float((xor / union).max())
    return out


def compare_proposals(mm_props, our_props):
    mb, ms = mm_props.bboxes, mm_props.scores
    ob, os_ = our_props.proposal_boxes.tensor, our_props.objectness_logits.sigmoid()
    iou = box_iou(mb, ob)
    best, j = iou.max(dim=1)
    same = best > 0.9999
    # what the unmatched ones are: rank, score, and the IoU with our nearest proposal (the RPN's
    # NMS threshold is 0.7)
    rank = score_ranks(ms)
    unmatched = [
        {
            "rank": int(rank[i]),
            "score": float(ms[i]),
            "best_iou": float(best[i]),
            "same_score": int((ms == ms[i]).sum()),
        }
        for i in torch.nonzero(~same).flatten().tolist()[:10]
    ]
    return {
        "unmatched": unmatched,
        "mmdet": len(mb),
        "ours": len(ob),
        "same_box": int(same.sum()),
        "max_box_diff_px": float((mb[same] - ob[j[same]]).abs().max()) if same.any() else None,
        "max_score_diff": float((ms[same] - os_[j[same]]).abs().max()) if same.any() else None,
    }


@torch.no_grad()
def box_head_scores(mm, ours, x, feats, boxes, metas, image_size):
    """mmdetection's proposals through both box heads (every stage, stage-combined scores)."""
    from detectron2.structures import Boxes, Instances

    from mmdet.structures.bbox import bbox2roi

    rois = bbox2roi([boxes])
    head = mm.roi_head
    if hasattr(head, "_refine_roi"):
        _, cls_scores, _ = head._refine_roi(x, rois, metas, num_proposals_per_img=(len(boxes),))
        logits, last = cls_scores[0], head.bbox_head[-1]
    else:
        logits, last = head._bbox_forward(x, rois)["cls_score"], head.bbox_head
    if last.custom_activation:
        mm_probs = last.loss_cls.get_activation(logits)
    else:
        mm_probs = torch.softmax(logits, dim=-1)
    props = Instances(image_size)
    props.proposal_boxes = Boxes(boxes.clone())
    roi_heads = ours.roi_heads
    predictor = roi_heads.box_predictor
    if isinstance(predictor, torch.nn.ModuleList):  # a cascade: the last stage's
        predictor = predictor[-1]
    seen = []
    original = predictor.inference_from_scores

    def capture(b, s, shapes):
        seen.append(s[0])
        return original(b, s, shapes)

    predictor.inference_from_scores = capture
    try:
        roi_heads._forward_box(feats, [props])
    finally:
        predictor.inference_from_scores = original
    our_probs = seen[0]
    return {
        "rois": len(boxes),
        "max_prob_diff": float((mm_probs - our_probs).abs().max()),
        "same_top_class": float(
            (mm_probs[:, :-1].argmax(1) == our_probs[:, :-1].argmax(1)).double().mean()
        ),
    }


@torch.no_grad()
def run_model(spec, images, tmp, seed):
    name, mm_cfg, our_cfg, layout = spec
    t0 = time.time()
    mm, _ = mmdet_model(mm_cfg)  # registers mmdetection's modules and scope first
    pipeline = mmdet_pipeline()
    data = [pipeline(dict(img_path=p, img_id=i)) for i, p in enumerate(images)]
    first = mm.data_preprocessor(
        {"inputs": [data[0]["inputs"]], "data_samples": [data[0]["data_samples"]]}, False
    )
    randomise(mm, first["inputs"], seed)
    weights, convert_log = convert(mm, tmp, our_cfg)
    ours, cfg = our_model(our_cfg, weights)
    row = {
        "model": name,
        "mmdet_config": mm_cfg,
        "config": our_cfg,
        "layout": layout_matches(mm, layout),
    }
    row["conversion"] = convert_log.strip().splitlines()
    per_image = []
    for d in data:
        batch = mm.data_preprocessor(
            {"inputs": [d["inputs"]], "data_samples": [d["data_samples"]]}, False
        )
        inputs, samples = batch["inputs"], batch["data_samples"]
        meta = samples[0].metainfo
        oh, ow = meta["ori_shape"]
        # the same resized image for both: mmdetection's cv2 resize, in RGB
        rgb = d["inputs"][[2, 1, 0]].float()
        our_in = [{"image": rgb, "height": oh, "width": ow}]
        images_d2 = ours.preprocess_image(our_in)
        r = {"input_max_diff": float((images_d2.tensor - inputs).abs().max())}
        res = ours.backbone.bottom_up(images_d2.tensor)
        r["backbone_rel_diff"] = max(
            rel(res[f"res{i + 2}"], c) for i, c in enumerate(mm.backbone(inputs))
        )
        x = mm.extract_feat(inputs)
        feats = ours.backbone(images_d2.tensor)
        r["features_rel_diff"] = max(rel(feats[f"p{i + 2}"], x[i]) for i in range(5))
        mm_props = mm.rpn_head.predict(x, samples, rescale=False)
        our_props, _ = ours.proposal_generator(images_d2, feats)
        r["proposals"] = compare_proposals(mm_props[0], our_props[0])
        r["box_head"] = box_head_scores(
            mm, ours, x, feats, mm_props[0].bboxes, [meta], images_d2.image_sizes[0]
        )
        mm_res = mm.roi_head.predict(x, mm_props, samples, rescale=True)[0]
        our_res = ours.inference(our_in)[0]["instances"]
        # mmcv's max_coordinate: the largest candidate coordinate, at most the larger side of
        # the resized image (boxes are clipped to it)
        scale = torch.tensor(meta["scale_factor"], dtype=torch.float64).repeat(2)
        r["detections"] = compare_detections(mm_res, our_res, max(meta["img_shape"]), scale)
        # each framework's own pre-processing of the file
        own = own_pipeline_detections(ours, cfg, d["data_samples"].img_path)
        same_size = tuple(own["image"].shape[-2:]) == tuple(d["inputs"].shape[-2:])
        pixel_diff = (own["image"].float() - rgb).abs() if same_size else None
        r["own_preprocessing"] = {
            "resized_size_same": same_size,
            "max_pixel_diff": float(pixel_diff.max()) if same_size else None,
            "mean_pixel_diff": float(pixel_diff.mean()) if same_size else None,
            "detections": compare_detections(
                mm_res, own["instances"], max(meta["img_shape"]), scale
            ),
        }
        per_image.append(r)
    row["images"] = per_image
    row["seconds"] = round(time.time() - t0, 1)
    return row


@torch.no_grad()
def own_pipeline_detections(ours, cfg, path):
    """This project's test-time pre-processing of the file (the config's INPUT.RESIZE_BACKEND)."""
    from detectron2.data.detection_utils import read_image

    from fasa_seesaw.data.resize import build_mapper

    mapper = build_mapper(cfg, is_train=False)
    h, w = read_image(path).shape[:2]
    d = mapper({"file_name": path, "height": h, "width": w, "image_id": 0})
    out = ours.inference([d])[0]["instances"]
    return {"image": d["image"], "instances": out}


def study_images(n):
    """The first images of the built-in long-tailed dataset's val split (LVIS format)."""
    from fasa_seesaw.data.synth import STUDY, ensure_generated

    paths = ensure_generated(STUDY)
    with open(paths["val_json"]) as f:
        gt = json.load(f)
    return [os.path.join(paths["val_image_root"], im["file_name"]) for im in gt["images"][:n]]


def _worst(ims, f, fmt):
    vals = [v for v in (f(r) for r in ims) if v is not None]
    return format(max(vals), fmt) if vals else "-"


def _frac(ims, f_num, f_den):
    return f"{sum(f_num(r) for r in ims)} / {sum(f_den(r) for r in ims)}"


def _pix(ims):
    n = sum(r["detections"].get("mask_pixels_differing", 0) for r in ims)
    d = sum(r["detections"].get("mask_pixels_total", 0) for r in ims)
    return f"{n} / {d} ({n / max(d, 1):.1e})"


def det(r):
    return r["detections"]


def own(r):
    return r["own_preprocessing"]


def markdown(rows):
    """One row per measure, one column per model."""
    table = None
    for row in rows:
        ims = row["images"]
        cells = [
            ("input", "max abs difference, normalised image",
             _worst(ims, lambda r: r["input_max_diff"], ".3g")),
            ("ResNet features", "max abs difference / max abs value (res2-res5)",
             _worst(ims, lambda r: r["backbone_rel_diff"], ".2g")),
            ("FPN features", "max abs difference / max abs value (P2-P6)",
             _worst(ims, lambda r: r["features_rel_diff"], ".2g")),
            ("proposals", "the same box (IoU > 0.9999), of mmdetection's",
             _frac(ims, lambda r: r["proposals"]["same_box"], lambda r: r["proposals"]["mmdet"])),
            ("proposals", "max box difference (px) / objectness difference",
             _worst(ims, lambda r: r["proposals"]["max_box_diff_px"], ".2g") + " / "
             + _worst(ims, lambda r: r["proposals"]["max_score_diff"], ".2g")),
            ("class scores, same boxes", "max abs probability difference",
             _worst(ims, lambda r: r["box_head"]["max_prob_diff"], ".2g")),
            ("detections", "matched (class, IoU > 0.999, score within 1e-4), of mmdetection's",
             _frac(ims, lambda r: det(r)["matched"], lambda r: det(r)["mmdet"])),
            ("detections", "max box difference (px) / score difference, matched",
             _worst(ims, lambda r: det(r).get("max_box_diff_px"), ".2g") + " / "
             + _worst(ims, lambda r: det(r).get("max_score_diff"), ".2g")),
            ("masks", "pixels differing / pixels in the union, matched detections", _pix(ims)),
            ("own pre-processing", "resized image, mean / max abs pixel difference",
             _worst(ims, lambda r: own(r)["mean_pixel_diff"], ".3g") + " / "
             + _worst(ims, lambda r: own(r)["max_pixel_diff"], ".3g")),
            ("own pre-processing", "detections matched, of mmdetection's",
             _frac(ims, lambda r: own(r)["detections"]["matched"],
                   lambda r: own(r)["detections"]["mmdet"])),
        ]  # fmt: skip
        if table is None:
            table = [[stage, measure] for stage, measure, _ in cells]
        for line, (_, _, value) in zip(table, cells):
            line.append(value)
    header = ["stage", "measure"] + [r["model"] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(line) + " |" for line in table or []]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.report_only:  # the table again, from <out>/equality.json
        with open(os.path.join(args.out, "equality.json")) as f:
            table = markdown(json.load(f)["models"])
        with open(os.path.join(args.out, "equality.md"), "w") as f:
            f.write(table)
        print(table)
        return 0
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    images = study_images(args.images)
    # and one that is not square (the study's images are 128 x 128): a 128 x 90 crop
    from PIL import Image

    crop = os.path.join(args.out, "crop_128x90.png")
    Image.open(images[0]).crop((0, 0, 128, 90)).save(crop)
    images.append(crop)
    chosen = [MODELS[i] for i in args.models] if args.models else MODELS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, spec in enumerate(chosen):
            print(f"[equality] {spec[0]} ...", flush=True)
            rows.append(run_model(spec, images, tmp, seed=k))
            print(json.dumps(rows[-1]["images"][0], indent=1, default=str), flush=True)
    import mmcv
    import mmdet

    report = {
        "mmdet": mmdet.__version__,
        "mmcv": mmcv.__version__,
        "torch": torch.__version__,
        "images": [os.path.relpath(p, ROOT) if p.startswith(ROOT) else p for p in images],
        "models": rows,
    }
    with open(os.path.join(args.out, "equality.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    table = markdown(rows)
    with open(os.path.join(args.out, "equality.md"), "w") as f:
        f.write(table)
    print(table)
    bad = [r["model"] for r in rows if any(r["layout"].values())]
    if bad:
        print(f"fasa_seesaw.modelzoo.layout differs from mmdetection for: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
