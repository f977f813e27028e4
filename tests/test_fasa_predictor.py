# Copyright (c) fasa_seesaw contributors.
"""FASA inside the box predictors: what the bank reads, where virtual features go."""

import numpy as np
import os
import unittest
import torch

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.utils.events import EventStorage

from fasa_seesaw import ConfigError, add_fasa_seesaw_config
from fasa_seesaw.engine import check_config
from fasa_seesaw.modeling import FASA, FASAFastRCNNOutputLayers, SeesawFastRCNNOutputLayers
from fasa_seesaw.testing import toy_fasa_seesaw_predictor
from fasa_seesaw.testing import toy_proposals as proposals

C, D = 5, 8
COUNTS = [400, 100, 20, 4, 1]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fasa_args(**over):
    args = {
        "loss_weight": 0.1,
        "samples_per_class": 2,
        "clamp_min_zero": False,
        "warmup_iters": 3,
        "bank_mode": "ema",
        "bank_momentum": 0.1,
        "sync_bank": True,
        "init_probs": "inverse_frequency",
        "instance_counts": lambda: COUNTS,
        "epoch_iters": lambda: 3,
    }
    args.update(over)
    return args


def make(cls=SeesawFastRCNNOutputLayers, **fasa_over):
    """The Seesaw predictor with the cosine classifier (the Seesaw recipe) and FASA."""
    return toy_fasa_seesaw_predictor(D, COUNTS, cls, **fasa_args(**fasa_over))


class TestFASAPredictor(unittest.TestCase):
    def test_bank_reads_classifier_input_of_positives(self):
        pred = make()
        pred.train()
        gt = [0, 0, 3, C, C, 1]
        x = torch.randn(len(gt), D)
        with EventStorage(0):
            pred.losses(pred(x), proposals(gt))
        torch.testing.assert_close(pred.fasa.bank.mean[0], x[:2].mean(0))
        torch.testing.assert_close(pred.fasa.bank.var[0], x[:2].var(0, unbiased=True))
        torch.testing.assert_close(pred.fasa.bank.mean[3], x[2])
        self.assertEqual(pred.fasa.bank.seen.tolist(), [True, True, False, True, False])

    def test_initial_probs_from_counts(self):
        pred = make()
        with EventStorage(0):
            pred.losses(pred(torch.randn(2, D)), proposals([0, C]))
        inv = 1.0 / np.array(COUNTS, dtype=np.float64)
        np.testing.assert_allclose(pred.fasa.probs.numpy(), inv / inv.sum(), rtol=1e-6)
        self.assertTrue(bool(pred.fasa.probs_initialized))
        uniform = make(init_probs="uniform")
        with EventStorage(0):
            uniform.losses(uniform(torch.randn(1, D)), proposals([1]))
        np.testing.assert_allclose(uniform.fasa.probs.numpy(), np.full(C, 1 / C), rtol=1e-6)

    def test_warmup_then_virtual_loss(self):
        pred = make()
        pred.fasa.probs_initialized.fill_(True)
        pred.fasa.probs.fill_(1.0)  # draw every seen class
        gt = [0, 1, 2, 3, 4, C]
        x = torch.randn(len(gt), D)
        with EventStorage(2) as storage:
            early = pred.losses(pred(x), proposals(gt))
            self.assertNotIn("fasa/num_virtual", storage.latest())
        self.assertEqual(early["loss_fasa"].item(), 0.0)
        with EventStorage(3) as storage:
            late = pred.losses(pred(x), proposals(gt))
            self.assertEqual(storage.latest()["fasa/num_virtual"][0], C * 2)
        self.assertGreater(late["loss_fasa"].item(), 0.0)

    def test_virtual_features_train_only_the_classifier(self):
        pred = make()
        pred.fasa.probs_initialized.fill_(True)
        pred.fasa.probs.fill_(1.0)
        x = torch.randn(6, D, requires_grad=True)
        with EventStorage(5):
            loss = pred.losses(pred(x), proposals([0, 1, 2, 3, 4, C]))["loss_fasa"]
        loss.backward()
        self.assertGreater(pred.cls_score.weight.grad.abs().sum().item(), 0)
        self.assertIsNone(pred.bbox_pred.weight.grad)
        self.assertIsNone(x.grad)  # the bank is detached from the real features

    def test_virtual_labels_never_reach_seesaw_counts(self):
        pred = make()
        pred.fasa.probs_initialized.fill_(True)
        pred.fasa.probs.fill_(1.0)
        gt = [0, 0, 2, C]
        with EventStorage(10):
            for _ in range(3):
                losses = pred.losses(pred(torch.randn(4, D)), proposals(gt))
        self.assertGreater(losses["loss_fasa"].item(), 0)
        self.assertEqual(pred.cls_loss.class_counts.tolist(), [6, 0, 3, 0, 0])

    def test_softmax_and_sigmoid_baselines(self):
        for kwargs in ({}, {"use_sigmoid_ce": True}):
            torch.manual_seed(0)
            pred = FASAFastRCNNOutputLayers(
                ShapeSpec(channels=D),
                box2box_transform=Box2BoxTransform(weights=(10, 10, 5, 5)),
                num_classes=C,
                fasa=FASA(C, D, **fasa_args(warmup_iters=0)),
                **kwargs,
            )
            pred.fasa.probs_initialized.fill_(True)
            pred.fasa.probs.fill_(1.0)
            with EventStorage(0):
                losses = pred.losses(pred(torch.randn(3, D)), proposals([1, 3, C]))
            self.assertEqual(set(losses), {"loss_cls", "loss_box_reg", "loss_fasa"})
            self.assertGreater(losses["loss_fasa"].item(), 0)

    def test_state_dict_carries_fasa_state(self):
        keys = set(make().state_dict())
        for k in (
            "fasa.probs",
            "fasa.probs_initialized",
            "fasa.bank.mean",
            "fasa.bank.var",
            "cls_loss.class_counts",
        ):
            self.assertIn(k, keys)

    def test_loads_checkpoints_with_the_old_keys(self):
        # Before the loss and FASA became modules their state sat on the predictor.
        src = make()
        with EventStorage(0):
            src.losses(src(torch.randn(6, D)), proposals([0, 0, 3, C, C, 1]))
        src.fasa.probs.mul_(0.5)
        old = {}
        for k, v in src.state_dict().items():
            if k == "cls_loss.class_counts":
                k = "class_counts"
            elif k.startswith("fasa."):
                k = "fasa_" + k[len("fasa.") :]
            old[k] = v.clone()
        self.assertIn("fasa_bank.mean", old)
        self.assertIn("fasa_probs", old)
        dst = make()
        dst.load_state_dict(old)  # strict: every old key has a home
        for k, v in src.state_dict().items():
            torch.testing.assert_close(dst.state_dict()[k], v, msg=k)
        self.assertEqual(dst.cls_loss.class_counts.tolist(), [2, 1, 0, 1, 0])
        self.assertTrue(bool(dst.fasa.probs_initialized))

    def test_fasa_needs_fc_feature(self):
        cfg = get_cfg()
        add_fasa_seesaw_config(cfg)
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = C
        cfg.MODEL.FASA.ENABLED = True
        with self.assertRaisesRegex(ConfigError, "NUM_FC"):
            FASAFastRCNNOutputLayers(cfg, ShapeSpec(channels=D, height=7, width=7))
        pred = FASAFastRCNNOutputLayers(cfg, ShapeSpec(channels=D))
        self.assertIsInstance(pred.fasa, FASA)
        self.assertEqual(pred.fasa.bank.feature_dim, D)

    def test_config_errors(self):
        quick = os.path.join(ROOT, "configs/quickstart/mask_rcnn_R_18_FPN_ce_quickstart.yaml")
        cfg = get_cfg()
        add_fasa_seesaw_config(cfg)
        cfg.merge_from_file(quick)
        cfg.MODEL.FASA.ENABLED = True
        cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
        with self.assertRaisesRegex(
            ConfigError, r"MODEL\.FASA\.ENABLED need\(s\) the project's box predictor"
        ):
            check_config(cfg)
        for name in ("FASAROIHeads", "LongTailROIHeads"):
            cfg.MODEL.ROI_HEADS.NAME = name
            check_config(cfg)
        cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 0
        with self.assertRaisesRegex(ConfigError, "NUM_FC"):
            check_config(cfg)
        cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
        check_config(cfg)  # each key's own domain: tests/test_settings.py


if __name__ == "__main__":
    unittest.main()
