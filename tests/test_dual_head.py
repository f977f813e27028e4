# Copyright (c) fasa_seesaw contributors.
"""The dual-head classification stage on the predictor and in models (the train_net.py run from
a trained model, with its frozen-weight equality, is in test_end_to_end.py)."""

import os
import unittest
import torch
from torch.nn import functional as F

from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.utils.events import EventStorage

from fasa_seesaw import ConfigError, add_fasa_seesaw_config
from fasa_seesaw.config import merge_config
from fasa_seesaw.engine import Trainer, check_config
from fasa_seesaw.modeling import LongTailFastRCNNOutputLayers, SeesawLoss, box_predictors
from fasa_seesaw.modeling.dual_head import is_dual_head_key
from fasa_seesaw.testing import toy_detection_batch, toy_proposals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "configs/quickstart")
C, D = 5, 8


def seesaw_scores(logits):
    """Seesaw's test scores written from the paper: [softmax(class) * P_fg, P_bg]."""
    cls = F.softmax(logits[:, :C], dim=1)
    obj = F.softmax(logits[:, C:], dim=1)
    return torch.cat([cls * obj[:, :1], obj[:, 1:]], dim=1)


def predictor(seesaw: bool):
    torch.manual_seed(0)
    return LongTailFastRCNNOutputLayers(
        ShapeSpec(channels=D),
        box2box_transform=Box2BoxTransform(weights=(10, 10, 5, 5)),
        num_classes=C,
        cls_loss=SeesawLoss(C) if seesaw else None,
        normed_classifier=seesaw,
        dual_head=True,
        dual_cls_loss=SeesawLoss(C) if seesaw else None,
    )


class TestPredictor(unittest.TestCase):
    def test_scores_are_the_mean_of_both_classifiers(self):
        x = torch.randn(6, D)
        for seesaw in (False, True):
            with self.subTest(seesaw=seesaw):
                p = predictor(seesaw).eval()
                scores, deltas = p(x)
                n = C + (2 if seesaw else 1)
                self.assertEqual(tuple(scores.shape), (6, 2 * n))
                torch.testing.assert_close(scores[:, :n], p.cls_score(x))
                torch.testing.assert_close(scores[:, n:], p.dual_cls_score(x))
                act = seesaw_scores if seesaw else (lambda s: F.softmax(s, dim=1))
                expected = (act(p.cls_score(x)) + act(p.dual_cls_score(x))) / 2
                (probs,) = p.predict_probs((scores, deltas), [range(6)])
                torch.testing.assert_close(probs, expected)
                torch.testing.assert_close(probs.sum(1), torch.ones(6))

    def test_only_the_second_classifier_learns(self):
        x = torch.randn(6, D)
        gt = torch.tensor([0, 1, 4, 5, 5, 2])
        for seesaw in (False, True):
            with self.subTest(seesaw=seesaw):
                p = predictor(seesaw).train()
                with EventStorage():
                    losses = p.losses(p(x), toy_proposals(gt.tolist()))
                names = {"loss_cls_dual"} | ({"loss_cls_objectness_dual"} if seesaw else set())
                self.assertEqual(set(losses), names)
                sum(losses.values()).backward()
                for name, param in p.named_parameters():
                    if is_dual_head_key(name):
                        self.assertTrue(bool(param.grad.abs().sum() > 0), name)
                    else:  # zeros through the concatenated scores, or none at all
                        self.assertTrue(param.grad is None or not param.grad.any(), name)
                if seesaw:  # the second loss counts this batch; the first counts nothing
                    self.assertEqual(p.dual_cls_loss.class_counts.tolist(), [1, 1, 1, 0, 1])
                    self.assertEqual(p.cls_loss.class_counts.tolist(), [0] * C)
                if not seesaw:  # detectron2's softmax CE on the second classifier's logits
                    ce = F.cross_entropy(p.dual_cls_score(x), gt)
                    torch.testing.assert_close(losses["loss_cls_dual"], ce)

    def test_fasa_is_refused(self):
        from fasa_seesaw.testing import toy_fasa_seesaw_predictor

        with self.assertRaisesRegex(ConfigError, "FASA"):
            toy_fasa_seesaw_predictor(
                cls=lambda *a, **k: LongTailFastRCNNOutputLayers(
                    *a, dual_head=True, dual_cls_loss=SeesawLoss(4), **k
                )
            )


def load(config, opts=()):
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    on = ["MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED", "True", "MODEL.WEIGHTS", "x.pth"]
    return merge_config(cfg, os.path.join(QUICK, config), on + ["MODEL.DEVICE", "cpu"] + list(opts))


class TestModels(unittest.TestCase):
    def test_frozen_model_trains_only_the_new_classifiers(self):
        """Mask R-CNN, a cascade (a new classifier per stage; per-stage mask heads) and HTC-Lite:
        only the new classifiers require gradients, BatchNorm is frozen, and a training step gives
        only the second classifiers' losses (no box, mask, FASA or context loss from the ROI
        heads)."""
        for config, opts, stages in (
            ("mask_rcnn_R_18_FPN_seesaw_quickstart.yaml", [], 1),
            (
                "cascade_mask_rcnn_R_18_FPN_seesaw_quickstart.yaml",
                ["MODEL.ROI_BOX_CASCADE_HEAD.MASK_HEADS", "per_stage"],
                3,
            ),
            ("htc_lite_R_18_FPN_seesaw_quickstart.yaml", [], 3),  # the context encoder frozen too
        ):
            with self.subTest(config=config):
                cfg = load(config, opts)
                check_config(cfg)
                torch.manual_seed(0)
                model = Trainer.build_model(cfg)
                trainable = [n for n, p in model.named_parameters() if p.requires_grad]
                self.assertEqual(len(trainable), 2 * stages)  # weight and bias of each
                self.assertTrue(all(".dual_cls_score." in n for n in trainable))
                self.assertFalse(
                    any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()),
                    "BatchNorm left trainable",
                )
                self.assertTrue(any(isinstance(m, FrozenBatchNorm2d) for m in model.modules()))
                self.assertEqual(len(box_predictors(model)), stages)
                model.train()
                inputs = toy_detection_batch(n_images=2, size=96, seed=3)
                for x in inputs:
                    x["neg_category_ids"] = [1]
                with EventStorage():
                    losses = model(inputs)
                roi = {k for k in losses if not k.startswith("loss_rpn")}
                suffixes = [""] if stages == 1 else [f"_stage{k}" for k in range(stages)]
                expected = {
                    f"{name}_dual{s}"
                    for s in suffixes
                    for name in ("loss_cls", "loss_cls_objectness")
                }
                self.assertEqual(roi, expected)
                sum(losses.values()).backward()
                with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
                self.assertEqual(sorted(with_grad), sorted(trainable))

    def test_dual_head_checkpoint_refused_without_the_dual_head(self):
        """--eval-only's loading refuses a dual-head checkpoint in a config without the dual
        head (only the first classifier would be evaluated)."""
        import tempfile

        from fasa_seesaw.engine.checkpoint import CheckpointError, load_for_eval

        dual = Trainer.build_model(load("mask_rcnn_R_18_FPN_seesaw_quickstart.yaml"))
        cfg = load("mask_rcnn_R_18_FPN_seesaw_quickstart.yaml")
        cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED = False
        plain = Trainer.build_model(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "dual.pth")
            torch.save({"model": dual.state_dict()}, path)
            with self.assertRaisesRegex(CheckpointError, "DUAL_HEAD.ENABLED True"):
                load_for_eval(plain, path)
            load_for_eval(dual, path)  # the dual-head config takes it

    def test_settings_refused(self):
        cfg = load("mask_rcnn_R_18_FPN_seesaw_quickstart.yaml", ["MODEL.WEIGHTS", ""])
        with self.assertRaisesRegex(ConfigError, "MODEL.WEIGHTS is empty"):
            check_config(cfg)
        cfg = load("mask_rcnn_R_18_FPN_fasa_quickstart.yaml")
        with self.assertRaisesRegex(ConfigError, "FASA"):
            check_config(cfg)


if __name__ == "__main__":
    unittest.main()
