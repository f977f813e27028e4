# Copyright (c) fasa_seesaw contributors.
"""
The cascade switches that give mmdetection's Cascade Mask R-CNN (MODEL.ROI_BOX_CASCADE_HEAD
SCORE_AVERAGE, MASK_HEADS, STAGE_LOSS_WEIGHTS), checked on a real Seesaw cascade against
references written here from mmdetection's rules:

- test scores: the mean of the stages' C + 2 logits, then Seesaw's activation
  [softmax(classes) * P(fg), P(bg)] (CascadeRoIHead._refine_roi + SeesawLoss.get_activation);
- masks: every stage's mask head on the final boxes, the mean of their sigmoids at the box's
  class (CascadeRoIHead.predict_mask + merge_aug_masks);
- training: stage k's box and mask losses times its weight.
"""

import os
import unittest
import torch
from torch.nn import functional as F

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from fasa_seesaw import ConfigError, add_fasa_seesaw_config
from fasa_seesaw.config import merge_config
from fasa_seesaw.testing import toy_detection_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASCADE = os.path.join(ROOT, "configs/quickstart/cascade_mask_rcnn_R_18_FPN_seesaw_quickstart.yaml")
C = 30


def _cfg(*opts):
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    merge_config(
        cfg,
        CASCADE,
        ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "MODEL.ROI_HEADS.NUM_CLASSES",
         str(C), "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", *opts],
    )  # fmt: skip
    return cfg


def _model(*opts, seed=0):
    torch.manual_seed(seed)
    model = build_model(_cfg(*opts))
    # Spread the random classifiers so scores are far from uniform.
    with torch.no_grad():
        for p in model.roi_heads.box_predictor:
            p.cls_score.bias.normal_(0, 2.0)
        heads = model.roi_heads.mask_head
        for h in heads if isinstance(heads, torch.nn.ModuleList) else [heads]:
            h.predictor.weight.normal_(0, 0.5)
            h.predictor.bias.normal_(0, 1.0)
    return model


def _batch(n_images=2, size=64, seed=0):
    return toy_detection_batch(n_images, size, seed, num_classes=C, min_side=12.0)


def seesaw_activation(logits):
    """mmdetection's SeesawLoss.get_activation, written out."""
    classes = F.softmax(logits[:, :-2], dim=-1)
    obj = F.softmax(logits[:, -2:], dim=-1)
    return torch.cat([classes * obj[:, :1], obj[:, 1:]], dim=1)


def _capture_stage_logits(model):
    logits = []
    hooks = [
        p.cls_score.register_forward_hook(lambda m, i, o: logits.append(o.detach().clone()))
        for p in model.roi_heads.box_predictor
    ]
    return logits, hooks


def _capture_combined_scores(model):
    seen = []
    last = model.roi_heads.box_predictor[-1]
    original = last.inference_from_scores

    def wrapped(boxes, scores, image_shapes):
        seen.append([s.detach().clone() for s in scores])
        return original(boxes, scores, image_shapes)

    last.inference_from_scores = wrapped
    return seen


class TestScoreAverage(unittest.TestCase):
    def _scores(self, mode):
        model = _model("MODEL.ROI_BOX_CASCADE_HEAD.SCORE_AVERAGE", mode).eval()
        logits, hooks = _capture_stage_logits(model)
        seen = _capture_combined_scores(model)
        with torch.no_grad():
            model(_batch(seed=1))
        for h in hooks:
            h.remove()
        self.assertEqual(len(logits), 3)
        return logits, torch.cat(seen[0])

    def test_logits_mode_averages_logits_before_the_activation(self):
        logits, got = self._scores("logits")
        want = seesaw_activation(sum(logits) / 3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        # ... which is not the mean of the probabilities
        other = sum(seesaw_activation(z) for z in logits) / 3
        self.assertGreater((got - other).abs().max().item(), 1e-3)

    def test_probs_mode_is_detectron2s_mean_of_probabilities(self):
        logits, got = self._scores("probs")
        torch.testing.assert_close(
            got, sum(seesaw_activation(z) for z in logits) / 3, rtol=1e-5, atol=1e-7
        )


class TestPerStageMasks(unittest.TestCase):
    OPTS = ("MODEL.ROI_BOX_CASCADE_HEAD.MASK_HEADS", "per_stage")

    def test_three_heads_and_their_mean_probability_at_test(self):
        model = _model(*self.OPTS).eval()
        heads = model.roi_heads.mask_head
        self.assertEqual(len(heads), 3)
        self.assertEqual(sorted({k.split(".")[0] for k in heads.state_dict()}), ["0", "1", "2"])
        outs = []
        hooks = [h.predictor.register_forward_hook(lambda m, i, o: outs.append(o)) for h in heads]
        with torch.no_grad():
            inst = model.inference(_batch(seed=1), do_postprocess=False)
        for h in hooks:
            h.remove()
        classes = torch.cat([i.pred_classes for i in inst])
        self.assertGreater(len(classes), 0)
        rows = torch.arange(len(classes))
        want = sum(o[rows, classes].sigmoid() for o in outs) / 3
        got = torch.cat([i.pred_masks for i in inst])[:, 0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        self.assertGreater((got - outs[-1][rows, classes].sigmoid()).abs().max().item(), 1e-3)

    def test_every_head_trains_on_its_stage(self):
        model = _model(*self.OPTS).train()
        with EventStorage():
            losses = model(_batch())
        for k in range(3):
            self.assertIn(f"loss_mask_stage{k}", losses)
        self.assertNotIn("loss_mask", losses)
        sum(losses.values()).backward()
        for k, head in enumerate(model.roi_heads.mask_head):
            grad = head.predictor.weight.grad
            self.assertTrue(grad is not None and grad.abs().sum() > 0, f"head {k}")

    def test_each_stage_trains_on_its_own_matches(self):
        """Stage k's mask targets are the masks of the ground truth its RoIs match at stage k's
        IoU (the toy masks are the boxes, so a mask's box is its ground-truth box); an image
        without ground truth trains nothing."""
        model = _model(*self.OPTS).train()
        seen = []
        original = model.roi_heads._per_stage_mask_losses

        def capture(features, stage_proposals):
            seen.append(stage_proposals)
            return original(features, stage_proposals)

        model.roi_heads._per_stage_mask_losses = capture
        batch = _batch()
        batch[1]["instances"] = batch[1]["instances"][:0]  # no ground truth
        with EventStorage():
            losses = model(batch)
        self.assertTrue(all(torch.isfinite(v) for v in losses.values()))
        (stages,) = seen
        self.assertEqual(len(stages), 3)
        for k, per_image in enumerate(stages):
            fg = per_image[0][per_image[0].gt_classes < C]
            self.assertGreater(len(fg), 0, f"stage {k}")
            mask_boxes = fg.gt_masks.get_bounding_boxes().tensor
            torch.testing.assert_close(mask_boxes, fg.gt_boxes.tensor, msg=f"stage {k}")
            self.assertFalse(bool((per_image[1].gt_classes < C).any()))

    def test_one_head_is_detectron2s(self):
        model = _model().train()
        self.assertNotIsInstance(model.roi_heads.mask_head, torch.nn.ModuleList)
        with EventStorage():
            losses = model(_batch())
        self.assertIn("loss_mask", losses)


class TestStageLossWeights(unittest.TestCase):
    def _losses(self, weights):
        opts = ["MODEL.ROI_BOX_CASCADE_HEAD.MASK_HEADS", "per_stage"]
        if weights is not None:
            opts += ["MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS", str(weights)]
        model = _model(*opts).train()
        torch.manual_seed(5)  # the same RoI sampling in both runs
        with EventStorage():
            return {k: v.item() for k, v in model(_batch()).items()}

    def test_each_stage_is_scaled_by_its_weight(self):
        plain = self._losses(None)
        weighted = self._losses([1.0, 0.5, 0.25])
        self.assertEqual(set(plain), set(weighted))
        for name, value in plain.items():
            w = {"_stage1": 0.5, "_stage2": 0.25}.get(name[-7:], 1.0)
            self.assertAlmostEqual(weighted[name], value * w, places=5, msg=name)
        self.assertGreater(plain["loss_mask_stage2"], 0)

    def test_weights_replace_the_gradient_scaling(self):
        """With weights (even all 1) the pooled box features' gradient is not scaled by 1/3:
        the same losses, the same gradients on the box heads, other gradients upstream."""

        def grads(weights):
            opts = (
                []
                if weights is None
                else ["MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS", str(weights)]
            )
            model = _model(*opts).train()
            torch.manual_seed(5)
            with EventStorage():
                losses = model(_batch())
            sum(losses.values()).backward()
            head = model.roi_heads.box_head[1].fc1.weight.grad.clone()
            fpn = model.backbone.fpn_output2.weight.grad.clone()
            return {k: v.item() for k, v in losses.items()}, head, fpn

        plain, head_plain, fpn_plain = grads(None)
        ones, head_ones, fpn_ones = grads([1.0, 1.0, 1.0])
        for name in plain:
            self.assertAlmostEqual(plain[name], ones[name], places=6, msg=name)
        torch.testing.assert_close(head_plain, head_ones)
        self.assertGreater((fpn_plain - fpn_ones).abs().max().item(), 1e-6)

    def test_one_weight_per_stage(self):
        with self.assertRaisesRegex(ConfigError, "STAGE_LOSS_WEIGHTS has 2 weights for 3 stages"):
            build_model(_cfg("MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS", "[1.0, 0.5]"))


class TestLVISSeesawCascadeConfigs(unittest.TestCase):
    def test_the_seesaw_reference_cascade(self):
        """The Seesaw cascade recipes (and the converted mmdetection ones) use mmdetection's
        conventions, with its last stage's box weights 1 / target_stds."""
        lvis = os.path.join(ROOT, "configs/LVISv1-InstanceSegmentation")
        names = [
            "cascade_mask_rcnn_R_101_FPN_2x_seesaw_random_lvis_v1.yaml",
            "cascade_mask_rcnn_R_50_FPN_2x_seesaw_normed_mask_random_lvis_v1.yaml",
            "mmdet_converted/cascade_mask_rcnn_R_101_FPN_2x_seesaw_rfs_mmdet.yaml",
        ]
        stds = [(0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067)]
        for name in names:
            cfg = get_cfg()
            add_fasa_seesaw_config(cfg)
            merge_config(cfg, os.path.join(lvis, name))
            c = cfg.MODEL.ROI_BOX_CASCADE_HEAD
            self.assertEqual((c.SCORE_AVERAGE, c.MASK_HEADS), ("logits", "per_stage"), name)
            self.assertEqual(list(c.STAGE_LOSS_WEIGHTS), [1.0, 0.5, 0.25])
            for weights, std in zip(c.BBOX_REG_WEIGHTS, stds):
                for w, s in zip(weights, std):
                    self.assertAlmostEqual(w, 1 / s, places=9)


if __name__ == "__main__":
    unittest.main()
