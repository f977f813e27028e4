# Copyright (c) fasa_seesaw contributors.
"""Every yaml under configs/ loads and builds its model; bad configs fail with a clear message."""

import glob
import os
import unittest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from fasa_seesaw import ConfigError, add_fasa_seesaw_config
from fasa_seesaw.engine import check_config
from fasa_seesaw.modeling import (
    NormedConv2d,
    SeesawCascadeROIHeads,
    SeesawFastRCNNOutputLayers,
    SeesawROIHeads,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def load(path, opts=()):
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


class TestConfigs(unittest.TestCase):
    def test_found_configs(self):
        names = {os.path.basename(p) for p in CONFIGS}
        self.assertIn("mask_rcnn_R_50_FPN_2x_seesaw_rfs_lvis_v1.yaml", names)
        self.assertIn("cascade_mask_rcnn_R_101_FPN_2x_seesaw_random_lvis_v1.yaml", names)
        self.assertIn("mask_rcnn_R_18_FPN_seesaw_quickstart.yaml", names)

    def test_every_config_builds(self):
        torch.manual_seed(0)
        for path in CONFIGS:
            if os.path.basename(path) == "Base-RCNN-FPN.yaml":
                continue  # a fragment: no dataset or class count of its own
            with self.subTest(config=os.path.relpath(path, ROOT)):
                cfg = load(path, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
                model = build_model(cfg)
                heads = model.roi_heads
                name = os.path.basename(path).lower()
                if "seesaw" in name:
                    expected = SeesawCascadeROIHeads if "cascade" in name else SeesawROIHeads
                    self.assertIsInstance(heads, expected)
                    predictors = (
                        heads.box_predictor
                        if isinstance(heads.box_predictor, torch.nn.ModuleList)
                        else [heads.box_predictor]
                    )
                    for p in predictors:
                        self.assertIsInstance(p, SeesawFastRCNNOutputLayers)
                        self.assertEqual(
                            p.cls_score.out_features, cfg.MODEL.ROI_HEADS.NUM_CLASSES + 2
                        )
                    if "cascade" in name:
                        self.assertEqual(len(predictors), 3)
                        counts = {id(p.class_counts) for p in predictors}
                        self.assertEqual(len(counts), 3, "each stage needs its own counter")
                if "fasa" in name:
                    preds = heads.box_predictor
                    preds = preds if isinstance(preds, torch.nn.ModuleList) else [preds]
                    for p in preds:
                        self.assertIsNotNone(p.fasa, "FASA config without FASA predictors")
                        self.assertEqual(p.fasa_bank.feature_dim, p.cls_score.in_features)
                if "normed_mask" in name or "normedmask" in name:
                    self.assertIsInstance(heads.mask_head.predictor, NormedConv2d)
                del model

    def test_lvis_recipe_values(self):
        cfg = load(
            os.path.join(
                ROOT,
                "configs/LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_seesaw_rfs_lvis_v1.yaml",
            )
        )
        self.assertEqual(cfg.MODEL.ROI_HEADS.NUM_CLASSES, 1203)
        self.assertEqual(cfg.SOLVER.MAX_ITER, 150000)
        self.assertEqual(tuple(cfg.SOLVER.STEPS), (100000, 137500))
        self.assertEqual(cfg.DATALOADER.SAMPLER_TRAIN, "RepeatFactorTrainingSampler")
        self.assertAlmostEqual(cfg.DATALOADER.REPEAT_THRESHOLD, 0.001)
        self.assertEqual(cfg.TEST.DETECTIONS_PER_IMAGE, 300)
        self.assertAlmostEqual(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST, 1e-4)
        self.assertEqual(tuple(cfg.INPUT.MIN_SIZE_TRAIN), (640, 672, 704, 736, 768, 800))
        self.assertEqual(cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE, 512)
        self.assertAlmostEqual(cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION, 0.25)


class TestConfigErrors(unittest.TestCase):
    QUICK = os.path.join(ROOT, "configs/quickstart/mask_rcnn_R_18_FPN_seesaw_quickstart.yaml")

    def test_num_classes_mismatch(self):
        cfg = load(self.QUICK, ["MODEL.ROI_HEADS.NUM_CLASSES", "31"])
        with self.assertRaisesRegex(ConfigError, r"NUM_CLASSES is 31 .* has 30 categories"):
            check_config(cfg)
        check_config(load(self.QUICK))

    def test_seesaw_with_sigmoid_or_fed_loss(self):
        for key in ("MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", "MODEL.ROI_BOX_HEAD.USE_FED_LOSS"):
            cfg = load(self.QUICK, [key, "True"])
            with self.assertRaisesRegex(ConfigError, "cannot be combined"):
                check_config(cfg)

    def test_invalid_p_q_eps(self):
        for key, value in (("P", "-0.5"), ("Q", "-1.0"), ("EPS", "0.0"), ("EPS", "1.5")):
            cfg = load(self.QUICK, [f"MODEL.SEESAW.{key}", value])
            with self.assertRaisesRegex(ConfigError, f"MODEL.SEESAW.{key}"):
                check_config(cfg)


class TestSeesawHeadsForward(unittest.TestCase):
    """Train and inference forward passes of the Seesaw ROI heads inside a real Mask R-CNN."""

    def _batch(self, n_images=2, size=64, seed=0):
        from detectron2.structures import Boxes, Instances, PolygonMasks

        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n_images):
            xy = torch.rand(3, 2, generator=g) * 30
            boxes = torch.cat([xy, xy + 10 + torch.rand(3, 2, generator=g) * 15], dim=1)
            inst = Instances((size, size))
            inst.gt_boxes = Boxes(boxes)
            inst.gt_classes = torch.randint(0, 30, (3,), generator=g)
            inst.gt_masks = PolygonMasks(
                [[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in boxes.tolist()]
            )
            image = torch.randint(0, 255, (3, size, size), generator=g).float()
            out.append({"image": image, "instances": inst, "height": size, "width": size})
        return out

    def test_cascade_stages(self):
        from detectron2.utils.events import EventStorage

        path = os.path.join(
            ROOT, "configs/quickstart/cascade_mask_rcnn_R_18_FPN_seesaw_quickstart.yaml"
        )
        cfg = load(path, ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"])
        torch.manual_seed(0)
        model = build_model(cfg)
        model.train()
        with EventStorage():
            losses = model(self._batch())
        for k in range(3):
            for name in ("loss_cls", "loss_cls_objectness", "loss_box_reg"):
                self.assertIn(f"{name}_stage{k}", losses)
        sum(losses.values()).backward()
        counts = [p.class_counts.clone() for p in model.roi_heads.box_predictor]
        for c in counts:
            self.assertGreater(c.sum().item(), 0)
        model.eval()
        with torch.no_grad():
            out = model(self._batch(seed=1))
        for o in out:
            scores = o["instances"].scores
            self.assertTrue(bool(((scores >= 0) & (scores <= 1)).all()))
            self.assertTrue(o["instances"].has("pred_masks"))
        # inference leaves the counts alone
        for c, p in zip(counts, model.roi_heads.box_predictor):
            self.assertTrue(torch.equal(c, p.class_counts))


if __name__ == "__main__":
    unittest.main()
