# Copyright (c) fasa_seesaw contributors.
"""Test-time augmentation (TEST.AUG) on the smoke data: a Seesaw cascade (both cascade
conventions, and HTC-Lite), valid detections that differ from the plain run, the identity
augmentation that reproduces it, the LVIS evaluation through the trainer, and the settings it
refuses."""

import numpy as np
import os
import tempfile
import unittest
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader
from detectron2.modeling import build_model

from fasa_seesaw import ConfigError, add_fasa_seesaw_config
from fasa_seesaw.config import merge_config
from fasa_seesaw.data.resize import build_mapper
from fasa_seesaw.engine import Trainer, check_config
from fasa_seesaw.modeling.tta import build_tta_model, tta_test_mapper
from fasa_seesaw.testing import SMOKE_OPTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASCADE = os.path.join(ROOT, "configs/quickstart/cascade_mask_rcnn_R_18_FPN_seesaw_quickstart.yaml")
TTA = ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(48, 96)", "TEST.AUG.MAX_SIZE", "200"]
MMDET_CASCADE = [
    "MODEL.ROI_BOX_CASCADE_HEAD.SCORE_AVERAGE",
    "logits",
    "MODEL.ROI_BOX_CASCADE_HEAD.MASK_HEADS",
    "per_stage",
]
# HTC-Lite: the context encoder's vector in the box and mask features, also on given boxes.
HTC_LITE = [
    "MODEL.META_ARCHITECTURE", "GlobalContextRCNN",
    "MODEL.ROI_BOX_CASCADE_HEAD.MASK_HEADS", "last",
    "MODEL.GLOBAL_CONTEXT.ENABLED", "True",
    "MODEL.GLOBAL_CONTEXT.CONV_DIM", "64",
]  # fmt: skip


def load(opts=()):
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    base = SMOKE_OPTS + ["MODEL.DEVICE", "cpu", "TEST.DETECTIONS_PER_IMAGE", "50"]
    return merge_config(cfg, CASCADE, base + list(opts))


def first_images(cfg, mapper, n=3):
    loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0], mapper=mapper)
    out = []
    for batch in loader:
        out += batch
        if len(out) >= n:
            return out[:n]
    return out


@pytest.mark.slow
class TestTTASmoke(unittest.TestCase):
    def model(self, cfg):
        torch.manual_seed(0)
        model = build_model(cfg)
        model.eval()
        return model

    def test_valid_and_different_from_plain(self):
        for extra in ([], MMDET_CASCADE):
            with self.subTest(cascade=extra or "detectron2"):
                cfg = load(TTA + extra)
                check_config(cfg)
                model = self.model(cfg)
                C = cfg.MODEL.ROI_HEADS.NUM_CLASSES
                plain_in = first_images(cfg, build_mapper(cfg, False), n=2)
                tta_in = first_images(cfg, tta_test_mapper(cfg), n=2)
                with torch.no_grad():
                    plain = model(plain_in)
                    tta = build_tta_model(cfg, model)(tta_in)
                differ = False
                for x, p, t in zip(tta_in, plain, tta):
                    inst = t["instances"]
                    h, w = x["height"], x["width"]
                    self.assertEqual(tuple(x["image"].shape[1:]), (h, w), "original size in")
                    self.assertEqual(inst.image_size, (h, w))
                    self.assertTrue(0 < len(inst) <= 50)
                    b = inst.pred_boxes.tensor
                    self.assertTrue(bool(torch.isfinite(b).all()))
                    self.assertTrue(bool((b[:, 0] >= 0).all() and (b[:, 2] <= w).all()))
                    self.assertTrue(bool((b[:, 1] >= 0).all() and (b[:, 3] <= h).all()))
                    self.assertTrue(bool((inst.scores > 0).all() and (inst.scores <= 1).all()))
                    self.assertTrue(bool((inst.pred_classes >= 0).all()))
                    self.assertTrue(bool((inst.pred_classes < C).all()))
                    self.assertEqual(tuple(inst.pred_masks.shape), (len(inst), h, w))
                    self.assertEqual(inst.pred_masks.dtype, torch.bool)
                    pb = p["instances"].pred_boxes.tensor
                    differ |= pb.shape != b.shape or not torch.allclose(pb, b)
                self.assertTrue(differ, "TTA gave the plain run's detections")

    def test_identity_augmentation_reproduces_plain_run(self):
        """One augmentation at the test size without flip: detectron2's merge (class-wise NMS of
        the one set) and the mask pass on the merged boxes give the plain run's detections."""
        for extra in ([], MMDET_CASCADE, HTC_LITE):
            with self.subTest(cascade=extra or "detectron2"):
                cfg = load(["TEST.AUG.MIN_SIZES", "(64,)", "TEST.AUG.MAX_SIZE", "64"] + extra)
                cfg.TEST.AUG.FLIP = False
                model = self.model(cfg)
                with torch.no_grad():
                    plain = model(first_images(cfg, build_mapper(cfg, False)))
                    tta = build_tta_model(cfg, model)(first_images(cfg, tta_test_mapper(cfg)))
                for p, t in zip(plain, tta):
                    p, t = p["instances"], t["instances"]
                    po = np.lexsort((p.pred_classes.numpy(), -p.scores.numpy()))
                    to = np.lexsort((t.pred_classes.numpy(), -t.scores.numpy()))
                    torch.testing.assert_close(t.scores[to], p.scores[po])
                    # boxes go through the (identity) transform and back in float64
                    torch.testing.assert_close(
                        t.pred_boxes.tensor[to], p.pred_boxes.tensor[po], atol=1e-4, rtol=0
                    )
                    self.assertTrue(torch.equal(t.pred_classes[to], p.pred_classes[po]))
                    mismatch = (t.pred_masks[to] != p.pred_masks[po]).float().mean().item()
                    self.assertLess(mismatch, 1e-3)

    def test_trainer_evaluates_with_tta(self):
        with tempfile.TemporaryDirectory() as out:
            cfg = load(TTA + ["OUTPUT_DIR", out, "TEST.AUG.MIN_SIZES", "(64,)"])
            model = self.model(cfg)
            res = Trainer.test_with_TTA(cfg, model)
            self.assertEqual(set(res), {"bbox_TTA", "segm_TTA"})
            for task in res.values():
                for k in ("AP", "APr", "APc", "APf"):
                    self.assertTrue(0.0 <= task[k] <= 100.0 or np.isnan(task[k]), (k, task[k]))
            folder = os.path.join(out, "inference_TTA", cfg.DATASETS.TEST[0])
            self.assertTrue(os.path.isdir(folder))

    def test_dual_head_model_runs_its_mask_head_as_a_plain_model(self):
        """The dual-head stage's training-time mask switch leaves TTA's box pass (masks off)
        alone: the mask head runs once per augmentation, on the merged boxes."""
        opts = ["MODEL.WEIGHTS", "", "TEST.AUG.MIN_SIZES", "(64, 96)"]
        config = os.path.join(ROOT, "configs/quickstart/mask_rcnn_R_18_FPN_seesaw_quickstart.yaml")
        calls = {}
        for dual in (False, True):
            cfg = get_cfg()
            add_fasa_seesaw_config(cfg)
            extra = ["MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED", str(dual)]
            merge_config(cfg, config, SMOKE_OPTS + ["MODEL.DEVICE", "cpu"] + TTA + opts + extra)
            torch.manual_seed(0)
            model = Trainer.build_model(cfg)
            model.eval()
            n = []
            model.roi_heads.mask_head.register_forward_hook(lambda m, i, o, n=n: n.append(1))
            with torch.no_grad():
                build_tta_model(cfg, model)(first_images(cfg, tta_test_mapper(cfg), n=1))
            calls[dual] = len(n)
            self.assertTrue(model.roi_heads.mask_on)
        self.assertEqual(calls[True], calls[False])
        self.assertEqual(calls[False], 4)  # 2 sizes x (plain, flipped)


class TestTTASettings(unittest.TestCase):
    def test_cv2_resize_backend(self):
        """With INPUT.RESIZE_BACKEND cv2 every augmented image has mmcv's size (its rule written
        out here) and its transforms map boxes back to the original image."""
        from fasa_seesaw.modeling.tta import _CV2DatasetMapperTTA

        cfg = load(TTA + ["INPUT.RESIZE_BACKEND", "cv2", "TEST.AUG.MIN_SIZES", "(100, 200)"])
        h, w = 151, 302
        image = torch.randint(0, 255, (3, h, w), dtype=torch.uint8)
        out = _CV2DatasetMapperTTA(cfg)({"image": image, "height": h, "width": w})
        self.assertEqual(len(out), 4)
        box = np.array([[10.0, 20.0, 150.0, 140.0]])
        for d, short in zip(out, (100, 100, 200, 200)):
            scale = min(200 / max(h, w), short / min(h, w))  # mmcv's rescale_size
            self.assertEqual(
                tuple(d["image"].shape[1:]), (int(h * scale + 0.5), int(w * scale + 0.5))
            )
            tfm = d["transforms"]
            np.testing.assert_allclose(tfm.inverse().apply_box(tfm.apply_box(box)), box, atol=1e-3)

    def test_refused(self):
        check_config(load(TTA))
        for opts, pattern in (
            (["TEST.AUG.MIN_SIZES", "()"], "MIN_SIZES"),
            (["TEST.AUG.MIN_SIZES", "(0, 64)"], "MIN_SIZES"),
            (["TEST.AUG.MAX_SIZE", "0"], "MAX_SIZE"),
            (["TEST.LVIS.TOPK_PER_CLASS", "10000"], "TOPK_PER_CLASS"),
        ):
            with self.subTest(opts=opts), self.assertRaisesRegex(ConfigError, pattern):
                check_config(load(TTA + opts))


if __name__ == "__main__":
    unittest.main()
