# Copyright (c) fasa_seesaw contributors.
"""
HTC-Lite: the global context encoder (against a transcription of mmdetection's
GlobalContextHead, and its federated targets against a hand-made image), the reduced mask head
(one head, trained on the last stage's RoIs), the context in box and mask features (gradients),
each RoI with its own image's vector, the real loader's negatives, checkpoints, and the settings
refused. The quickstart run's numbers are in docs/htc_lite.md.
"""

import math
import os
import tempfile
import unittest
import torch
from torch.nn import functional as F

from detectron2.config import get_cfg
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage

from fasa_seesaw import ConfigError, add_fasa_seesaw_config
from fasa_seesaw.config import merge_config
from fasa_seesaw.engine import Trainer, check_config
from fasa_seesaw.modeling import GlobalContextHead
from fasa_seesaw.modeling.global_context import context_targets, image_negatives
from fasa_seesaw.testing import toy_detection_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "configs", "quickstart", "htc_lite_R_18_FPN_seesaw_quickstart.yaml")


def load(opts=()):
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    return merge_config(cfg, QUICK, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + list(opts))


def batch(num_classes, seed=3):
    out = toy_detection_batch(n_images=2, size=96, seed=seed, num_classes=num_classes)
    for x in out:
        x["neg_category_ids"] = [1, 2]  # LVIS ids (1-based)
    return out


def mmdet_global_context(head, x):
    """mmdetection's GlobalContextHead.forward with conv_to_res (two SimplifiedBasicBlocks
    without norm: conv3x3, ReLU, conv3x3, plus the input), written with F.conv2d on the head's
    weights: (multi-label logits, pooled vector)."""
    for block in head.convs:
        y = F.relu(F.conv2d(x, block.conv1.weight, block.conv1.bias, padding=1))
        x = F.conv2d(y, block.conv2.weight, block.conv2.bias, padding=1) + x
    vector = x.mean(dim=(2, 3))
    return vector @ head.fc.weight.t() + head.fc.bias, vector


class TestContextEncoder(unittest.TestCase):
    def head(self, roi_channels=16, **kw):
        torch.manual_seed(0)
        return GlobalContextHead(
            in_features=["p6"], in_channels=16, num_classes=7, roi_channels=roi_channels,
            conv_dim=16, **kw,
        )  # fmt: skip

    def test_output_shapes_and_mmdetection_forward(self):
        x = torch.randn(3, 16, 5, 7)
        head = self.head()
        logits, context = head({"p6": x, "p5": torch.randn(3, 16, 10, 14)})
        self.assertEqual(tuple(logits.shape), (3, 7))
        self.assertEqual(tuple(context.shape), (3, 16))
        self.assertIsNone(head.project)  # equal widths: no projection, as mmdetection's
        ref_logits, ref_vector = mmdet_global_context(head, x)
        torch.testing.assert_close(logits, ref_logits)
        torch.testing.assert_close(context, ref_vector)
        self.assertEqual(len(head.convs), 2)  # 4 convs, two per residual block
        # Another RoI width: the vector goes through a projection to it.
        head = self.head(roi_channels=24)
        logits, context = head({"p6": x})
        self.assertEqual(tuple(context.shape), (3, 24))
        _, vector = mmdet_global_context(head, x)
        torch.testing.assert_close(context, head.project(vector))

    def test_federated_targets_on_a_hand_made_image(self):
        """Image 0: boxes of classes 1 and 3 (twice), neg_category_ids [5, 7] (LVIS ids, so
        classes 4 and 6); image 1: one box of class 0, no negatives. Only the labelled entries
        count; the others (not exhaustively annotated) are not in the loss."""
        gt = [torch.tensor([1, 3, 3]), torch.tensor([0])]
        negatives = image_negatives([{"neg_category_ids": [5, 7]}, {"neg_category_ids": []}], 8)
        self.assertEqual(negatives, [[4, 6], []])
        targets, weights = context_targets(gt, negatives, 8, "federated")
        self.assertEqual(targets.tolist(), [[0, 1, 0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]])
        self.assertEqual(weights.tolist(), [[0, 1, 0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0, 0, 0]])
        # The loss: mean binary cross-entropy over the 5 labelled entries, times the weight.
        head = GlobalContextHead(
            in_features=["p6"], in_channels=4, num_classes=8, roi_channels=4, conv_dim=4,
            loss_weight=3.0,
        )  # fmt: skip
        logits = torch.linspace(-2.0, 2.0, 16).reshape(2, 8)
        loss = head.losses(logits, gt, negatives)["loss_global_context"]

        def bce(z, y):
            p = 1.0 / (1.0 + math.exp(-z))
            return -(y * math.log(p) + (1 - y) * math.log(1 - p))

        z = logits.double().tolist()
        labelled = [(0, 1, 1), (0, 3, 1), (0, 4, 0), (0, 6, 0), (1, 0, 1)]
        expected = 3.0 * sum(bce(z[i][c], y) for i, c, y in labelled) / len(labelled)
        self.assertAlmostEqual(float(loss), expected, places=5)
        # mmdetection's rule (exhaustive): every entry, absent ones negative.
        head.target = "exhaustive"
        loss = head.losses(logits, gt, None)["loss_global_context"]
        y = targets.tolist()
        expected = 3.0 * sum(bce(z[i][c], y[i][c]) for i in range(2) for c in range(8)) / 16
        self.assertAlmostEqual(float(loss), expected, places=5)

    def test_bad_negatives_are_one_error(self):
        with self.assertRaisesRegex(ConfigError, "no 'neg_category_ids'.*exhaustive"):
            image_negatives([{"file_name": "a.jpg"}], 8)
        with self.assertRaisesRegex(ConfigError, r"neg_category_ids \[9\] outside 1..8"):
            image_negatives([{"neg_category_ids": [9]}], 8)
        with self.assertRaisesRegex(ConfigError, "GlobalContextRCNN"):
            context_targets([torch.tensor([0])], None, 8, "federated")


class TestModel(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cfg = load()
        check_config(cls.cfg)
        torch.manual_seed(0)
        cls.model = Trainer.build_model(cls.cfg)
        cls.num_classes = cls.cfg.MODEL.ROI_HEADS.NUM_CLASSES

    def test_only_the_last_stage_has_a_mask_head(self):
        """One mask head (no per-stage heads), and it learns from the last stage's RoIs: the
        RoIs it is given are the foreground of those stage 3 classified, with their masks."""
        heads = self.model.roi_heads
        keys = [k for k in self.model.state_dict() if ".mask_head." in k]
        self.assertTrue(keys)
        layers = ("mask_fcn", "deconv", "predictor")  # one head's, not mask_head.<stage>.*
        self.assertTrue(all(k.split(".")[2].startswith(layers) for k in keys), keys)
        self.assertNotIsInstance(heads.mask_head, torch.nn.ModuleList)
        per_stage = Trainer.build_model(
            load(["MODEL.ROI_BOX_CASCADE_HEAD.MASK_HEADS", "per_stage"])
        )
        n_last = sum(p.numel() for p in heads.mask_head.parameters())
        n_all = sum(p.numel() for p in per_stage.roi_heads.mask_head.parameters())
        self.assertEqual(n_all, 3 * n_last)

        seen = {"stages": [], "mask": None}
        run_stage, mask_forward = heads._run_stage, heads.mask_head.forward

        def record_stage(features, proposals, stage):
            seen["stages"].append([p.proposal_boxes.tensor.clone() for p in proposals])
            seen.setdefault("labels", []).append([p.gt_classes.clone() for p in proposals])
            return run_stage(features, proposals, stage)

        def record_mask(x, instances):
            seen["mask"] = instances
            return mask_forward(x, instances)

        heads._run_stage, heads.mask_head.forward = record_stage, record_mask
        try:
            self.model.train()
            with EventStorage():
                losses = self.model(batch(self.num_classes))
        finally:
            del heads._run_stage, heads.mask_head.forward
        self.assertIn("loss_mask", losses)
        self.assertEqual(len(seen["stages"]), 3)
        self.assertGreater(sum(len(inst) for inst in seen["mask"]), 0)
        for i, inst in enumerate(seen["mask"]):
            fg = seen["labels"][2][i] < self.num_classes
            torch.testing.assert_close(inst.proposal_boxes.tensor, seen["stages"][2][i][fg])
            # The matched ground truth's masks (the toy masks are their boxes as polygons).
            self.assertEqual(len(inst.gt_masks), len(inst))
            torch.testing.assert_close(
                inst.gt_masks.get_bounding_boxes().tensor, inst.gt_boxes.tensor
            )

    def test_context_reaches_box_and_mask_features(self):
        """A gradient flows into the encoder from the mask loss alone and from one stage's box
        loss alone (its own loss aside), so the vector is in both heads' RoI features."""
        self.model.train()
        encoder = self.model.roi_heads.global_context
        for name in ("loss_mask", "loss_cls_stage2", "loss_box_reg_stage0", "loss_global_context"):
            with self.subTest(loss=name):
                self.model.zero_grad(set_to_none=True)
                with EventStorage():
                    losses = self.model(batch(self.num_classes))
                losses[name].backward()
                grad = encoder.convs[0].conv1.weight.grad
                self.assertIsNotNone(grad)
                self.assertGreater(float(grad.abs().sum()), 0.0)
                fc_grad = encoder.fc.weight.grad
                # Only the encoder's own loss reaches its classifier.
                self.assertEqual(fc_grad is not None and float(fc_grad.abs().sum()) > 0,
                                 name == "loss_global_context")  # fmt: skip
        self.model.zero_grad(set_to_none=True)

    def test_context_changes_inference(self):
        """At test the vector enters the box and mask heads: zeroing the encoder's output
        changes scores and masks, and detectron2's TTA path (boxes given) uses it too."""
        self.model.eval()
        inputs = batch(self.num_classes, seed=5)
        with torch.no_grad():
            out = self.model(inputs)
            encoder = self.model.roi_heads.global_context
            forward = encoder.forward

            def zero(features):
                logits, context = forward(features)
                return logits, torch.zeros_like(context)

            def given():  # the detected boxes, fresh (inference writes masks into them)
                return [
                    Instances(o["instances"].image_size, pred_boxes=o["instances"].pred_boxes,
                              pred_classes=o["instances"].pred_classes)
                    for o in out
                ]  # fmt: skip

            encoder.forward = zero
            try:
                off = self.model(inputs)
                masks_off = self.model.inference(inputs, given(), do_postprocess=False)
            finally:
                del encoder.forward
            masks_on = self.model.inference(inputs, given(), do_postprocess=False)
        a, b = out[0]["instances"], off[0]["instances"]
        self.assertFalse(len(a) == len(b) and torch.allclose(a.scores, b.scores))
        self.assertFalse(torch.allclose(masks_on[0].pred_masks, masks_off[0].pred_masks))

    def test_each_roi_gets_its_own_images_vector(self):
        """Two images of one size in a batch give what each gives alone: a RoI never gets the
        other image's context."""
        self.model.eval()
        inputs = batch(self.num_classes, seed=9)
        with torch.no_grad():
            together = self.model(inputs)
            alone = [self.model([x])[0] for x in inputs]
            vectors = self.model.roi_heads.global_context(
                self.model.backbone(self.model.preprocess_image(inputs).tensor)
            )[1]
        self.assertFalse(torch.allclose(vectors[0], vectors[1]))  # the images differ
        for t, a in zip(together, alone):
            t, a = t["instances"], a["instances"]
            torch.testing.assert_close(t.scores, a.scores, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(t.pred_masks, a.pred_masks, atol=1e-5, rtol=1e-4)

    def test_real_loader_passes_the_negatives(self):
        """The smoke data through detectron2's train loader: the batches carry neg_category_ids,
        GlobalContextRCNN turns them into contiguous ids, and a step trains the encoder."""
        from fasa_seesaw.testing import SMOKE_OPTS

        cfg = load(SMOKE_OPTS + ["SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0"])
        check_config(cfg)
        data = next(iter(Trainer.build_train_loader(cfg)))
        self.assertTrue(all("neg_category_ids" in x for x in data))
        torch.manual_seed(0)
        model = Trainer.build_model(cfg).train()
        seen = {}
        losses_of = model.roi_heads.global_context.losses

        def record(logits, gt_classes, negatives):
            seen["negatives"] = negatives
            return losses_of(logits, gt_classes, negatives)

        model.roi_heads.global_context.losses = record
        with EventStorage():
            losses = model(data)
        expected = [[c - 1 for c in x["neg_category_ids"]] for x in data]
        self.assertEqual(seen["negatives"], expected)
        self.assertTrue(any(expected), "the smoke images list verified negatives")
        self.assertTrue(torch.isfinite(losses["loss_global_context"]))

    def test_checkpoint_round_trip(self):
        from detectron2.checkpoint import DetectionCheckpointer

        self.model.eval()
        inputs = batch(self.num_classes, seed=7)
        with torch.no_grad():
            before = self.model(inputs)[0]["instances"]
        with tempfile.TemporaryDirectory() as tmp:
            DetectionCheckpointer(self.model, save_dir=tmp).save("htc")
            torch.manual_seed(1)  # other initial weights
            other = Trainer.build_model(self.cfg).eval()
            keys = [k for k in other.state_dict() if k.startswith("roi_heads.global_context.")]
            self.assertTrue(keys)
            DetectionCheckpointer(other).load(os.path.join(tmp, "htc.pth"))
        for k, v in self.model.state_dict().items():
            torch.testing.assert_close(other.state_dict()[k], v, msg=k)
        with torch.no_grad():
            after = other(inputs)[0]["instances"]
        torch.testing.assert_close(after.scores, before.scores)
        torch.testing.assert_close(after.pred_masks, before.pred_masks)


class TestWithTheRest(unittest.TestCase):
    def test_fasa_normed_mask_and_mmdetection_conventions(self):
        """HTC-Lite with FASA in every stage and the normed mask head, and with mmdetection's
        cascade conventions (stage loss weights: the one mask loss weighted by their sum, as
        mmdetection's SCNet; logits averaged): a training step's losses are all finite, FASA's
        and the encoder's among them, and the mask loss reaches the encoder."""
        cases = {
            "FASA, normed mask": [
                "MODEL.FASA.ENABLED", "True", "MODEL.FASA.WARMUP_ITERS", "0",
                "MODEL.ROI_MASK_HEAD.NAME", "NormedMaskRCNNConvUpsampleHead",
            ],
            "mmdetection's cascade": [
                "MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS", "[1.0, 0.5, 0.25]",
                "MODEL.ROI_BOX_CASCADE_HEAD.SCORE_AVERAGE", "logits",
            ],
        }  # fmt: skip
        for name, opts in cases.items():
            with self.subTest(case=name):
                cfg = load(opts)
                check_config(cfg)
                torch.manual_seed(0)
                model = Trainer.build_model(cfg).train()
                inputs = batch(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
                torch.manual_seed(1)  # the same RoI sampling in both cases
                with EventStorage():
                    losses = model(inputs)
                self.assertTrue(all(torch.isfinite(v) for v in losses.values()), losses)
                self.assertIn("loss_global_context", losses)
                if cfg.MODEL.FASA.ENABLED:
                    self.assertTrue(any("fasa" in k for k in losses), sorted(losses))
                losses["loss_mask"].backward()
                grad = model.roi_heads.global_context.convs[0].conv1.weight.grad
                self.assertGreater(float(grad.abs().sum()), 0.0)
                if not cfg.MODEL.FASA.ENABLED:
                    # The same model and RoIs without stage weights: 1.75 (1 + 0.5 + 0.25) times.
                    cfg = load()
                    torch.manual_seed(0)
                    unweighted_model = Trainer.build_model(cfg).train()
                    torch.manual_seed(1)
                    with EventStorage():
                        unweighted = unweighted_model(inputs)["loss_mask"]
                    torch.testing.assert_close(losses["loss_mask"], 1.75 * unweighted.detach())


class TestSettings(unittest.TestCase):
    def test_bad_settings_are_one_error_each(self):
        cases = [
            (["MODEL.GLOBAL_CONTEXT.IN_FEATURES", "[]"], "IN_FEATURES.*non-empty list"),
            (["MODEL.GLOBAL_CONTEXT.LOSS_WEIGHT", "-1.0"], "LOSS_WEIGHT.*>= 0"),
            (["MODEL.GLOBAL_CONTEXT.TARGET", "all"], "TARGET"),
            (["MODEL.GLOBAL_CONTEXT.NUM_CONVS", "3"], "NUM_CONVS is 3: make it even"),
            (["MODEL.META_ARCHITECTURE", "GeneralizedRCNN"], "ARCHITECTURE 'GlobalContextRCNN'"),
            (["MODEL.ROI_HEADS.NAME", "LongTailROIHeads"], "runs in the cascade ROI head"),
        ]  # fmt: skip
        for opts, message in cases:
            with self.subTest(opts=opts):
                with self.assertRaisesRegex(ConfigError, message):
                    check_config(load(opts))
        # A level the backbone does not have: at build, naming the levels it has.
        cfg = load(["MODEL.GLOBAL_CONTEXT.IN_FEATURES", "['p9']"])
        check_config(cfg)
        with self.assertRaisesRegex(ConfigError, r"\['p9'\].*choose from \['p2', 'p3'"):
            Trainer.build_model(cfg)
        # The exhaustive rule needs no negatives, so detectron2's meta-architecture serves.
        check_config(load(["MODEL.GLOBAL_CONTEXT.TARGET", "exhaustive",
                           "MODEL.META_ARCHITECTURE", "GeneralizedRCNN"]))  # fmt: skip


if __name__ == "__main__":
    unittest.main()
