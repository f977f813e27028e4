# Copyright (c) fasa_seesaw contributors.
"""NMS re-sampling: hand-made cases, both rules against plain-loop references written from
Forest R-CNN's rules, the proposal selection against detectron2's, and the RPN in a model."""

import numpy as np
import os
import unittest
import torch

from detectron2.config import get_cfg
from detectron2.layers import batched_nms
from detectron2.modeling import build_model
from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals
from detectron2.utils.events import EventStorage

from fasa_seesaw import ConfigError, add_fasa_seesaw_config
from fasa_seesaw.config import merge_config
from fasa_seesaw.engine import check_config
from fasa_seesaw.modeling.nms_resampling import (
    LongTailRPN,
    class_groups_from_frequency,
    discrete_resampling_nms,
    matched_resampling_nms,
    select_proposals,
    threshold_nms,
)
from fasa_seesaw.testing import toy_detection_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THRESHOLDS = (0.9, 0.8, 0.7)
RARE, COMMON, FREQUENT = 0, 1, 2


# ---------------------------------------------------------------------- references (plain loops)
def iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def greedy_nms(boxes, scores, thresh_of):
    """Forest R-CNN's nms_py: in score order, a kept box i removes boxes with IoU > thresh_of(i)."""
    order = sorted(range(len(boxes)), key=lambda i: -scores[i])
    keep = []
    while order:
        i = order.pop(0)
        keep.append(i)
        order = [j for j in order if iou(boxes[i], boxes[j]) <= thresh_of(i)]
    return keep


def per_level(boxes, scores, levels, run):
    kept = []
    for lv in sorted(set(levels)):
        idx = [i for i in range(len(boxes)) if levels[i] == lv]
        kept += [idx[k] for k in run([boxes[i] for i in idx], [scores[i] for i in idx])]
    return sorted(kept, key=lambda i: -scores[i])


def ref_matched(boxes, scores, levels, gt_boxes, gt_groups, match_iou=0.3):
    groups = []
    for b in boxes:
        ious = [iou(b, g) for g in gt_boxes]
        best = max(range(len(ious)), key=lambda k: ious[k]) if ious else None
        groups.append(gt_groups[best] if best is not None and ious[best] >= match_iou else FREQUENT)
    thr = [THRESHOLDS[g] for g in groups]
    return per_level(
        boxes,
        scores,
        levels,
        lambda bs, ss: greedy_nms(bs, ss, lambda i: thr[boxes.index(bs[i])]),
    )


def ref_discrete(boxes, scores, levels, gt_boxes, gt_groups, match_iou=0.3):
    def nms_at(t):
        return per_level(boxes, scores, levels, lambda bs, ss: greedy_nms(bs, ss, lambda i: t))

    def near(i, group):
        return any(
            iou(g, boxes[i]) >= match_iou for g, gg in zip(gt_boxes, gt_groups) if gg == group
        )

    out = []
    for group in (RARE, COMMON):
        if group in gt_groups:
            out += [i for i in nms_at(THRESHOLDS[group]) if near(i, group)]
    out += [
        i
        for i in nms_at(THRESHOLDS[FREQUENT])
        if not any(near(i, g) for g in (RARE, COMMON) if g in gt_groups)
    ]
    return sorted(out, key=lambda i: -scores[i])


def random_case(seed, n=60, num_gt=4):
    rng = np.random.RandomState(seed)
    xy = rng.uniform(0, 80, size=(n, 2))
    wh = rng.uniform(10, 40, size=(n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).round(1)
    scores = rng.permutation(n).astype(np.float64) / n  # distinct
    levels = rng.randint(0, 3, size=n)
    gxy = rng.uniform(0, 80, size=(num_gt, 2))
    gwh = rng.uniform(15, 40, size=(num_gt, 2))
    gt = np.concatenate([gxy, gxy + gwh], 1).round(1)
    groups = rng.randint(0, 3, size=num_gt)
    return boxes, scores, levels, gt, groups


def as_torch(boxes, scores, levels, gt, groups):
    return (
        torch.tensor(boxes, dtype=torch.float32),
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(levels, dtype=torch.long),
        torch.tensor(gt, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(groups, dtype=torch.long),
    )


class TestRules(unittest.TestCase):
    # A pair of boxes with IoU exactly 0.85 (nested: area ratio 85/100) on each of two objects.
    PAIR = [[0, 0, 100, 100], [0, 0, 100, 85]]

    def hand_made(self, group_of_first, group_of_second):
        boxes = self.PAIR + [[x + 300, y, X + 300, Y] for x, y, X, Y in self.PAIR]
        scores = [0.9, 0.8, 0.7, 0.6]
        gt = [[0, 0, 100, 100], [300, 0, 400, 100]]
        return as_torch(boxes, scores, [0, 0, 0, 0], gt, [group_of_first, group_of_second])

    def test_rare_pair_survives_frequent_pair_merges(self):
        self.assertAlmostEqual(iou(*self.PAIR), 0.85)
        for rule in (discrete_resampling_nms, matched_resampling_nms):
            with self.subTest(rule=rule.__name__):
                b, s, lv, gt, groups = self.hand_made(RARE, FREQUENT)
                keep = rule(b, s, lv, gt, groups, THRESHOLDS, 0.3).tolist()
                self.assertEqual(keep, [0, 1, 2], "rare pair both kept, frequent pair merged")
                # common (0.8) merges at 0.85 too; plain NMS at 0.7 merges both pairs
                b, s, lv, gt, groups = self.hand_made(COMMON, RARE)
                self.assertEqual(rule(b, s, lv, gt, groups, THRESHOLDS, 0.3).tolist(), [0, 2, 3])
                self.assertEqual(batched_nms(b, s, lv, 0.7).tolist(), [0, 2])

    def test_background_uses_frequent_threshold(self):
        # No ground truth near the boxes (or none at all): plain NMS at the frequent threshold.
        b, s, lv, _, _ = self.hand_made(RARE, RARE)
        far = torch.tensor([[900.0, 900, 950, 950]], dtype=torch.float32)
        for gt, groups in (
            (far, torch.tensor([RARE])),
            (far[:0], torch.zeros(0, dtype=torch.long)),
        ):
            for rule in (discrete_resampling_nms, matched_resampling_nms):
                keep = rule(b, s, lv, gt, groups, (0.9, 0.8, 0.86), 0.3)
                self.assertEqual(keep.tolist(), [0, 1, 2, 3])  # 0.85 <= 0.86
                keep = rule(b, s, lv, gt, groups, THRESHOLDS, 0.3)
                self.assertEqual(keep.tolist(), batched_nms(b, s, lv, 0.7).tolist())

    def test_rules_match_plain_loop_references(self):
        for seed in range(12):
            case = random_case(seed)
            t = as_torch(*case)
            boxes, scores, levels, gt, groups = (x.tolist() for x in case)
            with self.subTest(seed=seed):
                self.assertEqual(
                    matched_resampling_nms(*t, THRESHOLDS, 0.3).tolist(),
                    ref_matched(boxes, scores, levels, gt, groups),
                )
                self.assertEqual(
                    discrete_resampling_nms(*t, THRESHOLDS, 0.3).tolist(),
                    ref_discrete(boxes, scores, levels, gt, groups),
                )

    def test_discrete_rule_can_keep_a_proposal_twice(self):
        # As the official code concatenates its passes: a box near a rare and a common object.
        b, s, lv, _, _ = as_torch([[0, 0, 100, 100]], [0.5], [0], [[0, 0, 1, 1]], [0])
        gt = torch.tensor([[0.0, 0, 100, 100], [0, 0, 100, 90]], dtype=torch.float32)
        keep = discrete_resampling_nms(b, s, lv, gt, torch.tensor([RARE, COMMON]), THRESHOLDS, 0.3)
        self.assertEqual(keep.tolist(), [0, 0])
        keep = matched_resampling_nms(b, s, lv, gt, torch.tensor([RARE, COMMON]), THRESHOLDS, 0.3)
        self.assertEqual(keep.tolist(), [0])

    def test_threshold_nms_with_one_threshold_is_nms(self):
        case = as_torch(*random_case(3, n=200))
        b, s = case[0], case[1]
        for t in (0.3, 0.5, 0.7):
            self.assertEqual(
                threshold_nms(b, s, torch.full((len(b),), t, dtype=b.dtype)).tolist(),
                batched_nms(b, s, torch.zeros(len(b), dtype=torch.long), t).tolist(),
            )
        self.assertEqual(threshold_nms(b[:0], s[:0], s[:0]).tolist(), [])

    def test_class_groups(self):
        self.assertEqual(class_groups_from_frequency(["f", "r", "c"]).tolist(), [2, 0, 1])
        with self.assertRaisesRegex(ConfigError, "frequency group"):
            class_groups_from_frequency(["f", "x"])


def load_quickstart(opts=()):
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    path = os.path.join(ROOT, "configs/quickstart/mask_rcnn_R_18_FPN_ce_quickstart.yaml")
    base = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.PROPOSAL_GENERATOR.NAME"]
    return merge_config(cfg, path, base + ["LongTailRPN"] + list(opts))


class TestRPN(unittest.TestCase):
    def test_selection_matches_detectron2(self):
        torch.manual_seed(0)
        levels = [(2, 300), (2, 120), (2, 40)]
        proposals = [torch.rand(n, k, 4).cumsum(-1) * 30 for n, k in levels]
        logits = [torch.randn(n, k) for n, k in levels]
        sizes = [(100, 120), (90, 80)]
        ours = select_proposals(
            proposals, logits, sizes, 200, 150, 1.0, lambda n, b, s, lv: batched_nms(b, s, lv, 0.7)
        )
        theirs = find_top_rpn_proposals(proposals, logits, sizes, 0.7, 200, 150, 1.0, True)
        for a, b in zip(ours, theirs):
            self.assertTrue(torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor))
            self.assertTrue(torch.equal(a.objectness_logits, b.objectness_logits))

    def test_rpn_in_a_model(self):
        """Off, or at test, LongTailRPN is detectron2's RPN; on, training proposals change."""
        on = ["MODEL.RPN.NMS_RESAMPLING.ENABLED", "True"]
        no_cut = ["MODEL.RPN.POST_NMS_TOPK_TRAIN", "5000"]  # every NMS survivor is returned
        torch.manual_seed(0)
        plain = build_model(load_quickstart(no_cut))
        torch.nn.init.normal_(plain.proposal_generator.rpn_head.anchor_deltas.weight, std=0.1)
        torch.manual_seed(0)
        model = build_model(load_quickstart(on + no_cut))
        self.assertIsInstance(model.proposal_generator, LongTailRPN)
        model.load_state_dict(plain.state_dict())
        # rare classes of the quickstart data
        groups = model.proposal_generator.class_groups
        self.assertEqual(len(groups), model.roi_heads.num_classes)
        self.assertTrue({0, 1, 2} <= set(groups.tolist()))
        images = toy_detection_batch(n_images=2, size=128, seed=1)
        rare = torch.nonzero(groups == RARE).squeeze(1)
        for x in images:  # objects of rare classes: their proposals survive at 0.9, not 0.7
            x["instances"].gt_classes = rare[: len(x["instances"])]
        batch = model.preprocess_image(images)
        gts = [x["instances"] for x in images]
        with EventStorage():
            for m in (plain, model):
                m.train()
            feats = plain.backbone(batch.tensor)
            a, _ = plain.proposal_generator(batch, feats, gts)
            b, _ = model.proposal_generator(batch, feats, gts)
            for x, y in zip(a, b):  # more survive around the rare objects
                self.assertGreater(len(y), len(x))
            for m in (plain, model):
                m.eval()
            a, _ = plain.proposal_generator(batch, feats, None)
            b, _ = model.proposal_generator(batch, feats, None)
            for x, y in zip(a, b):
                self.assertTrue(torch.equal(x.proposal_boxes.tensor, y.proposal_boxes.tensor))

    def test_training_step_mask_and_cascade(self):
        """NR trains Mask R-CNN and Cascade Mask R-CNN: finite losses, gradients into the heads."""
        on = ["MODEL.RPN.NMS_RESAMPLING.ENABLED", "True"]
        cascade = [
            "MODEL.ROI_HEADS.NAME",
            "LongTailCascadeROIHeads",
            "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG",
            "True",
        ]
        for opts in (on, on + cascade):
            with self.subTest(opts=opts):
                torch.manual_seed(0)
                model = build_model(load_quickstart(opts))
                model.train()
                with EventStorage():
                    losses = model(toy_detection_batch(n_images=2, size=96, seed=2))
                total = sum(losses.values())
                self.assertTrue(torch.isfinite(total))
                total.backward()

    def test_config_errors(self):
        check_config(load_quickstart(["MODEL.RPN.NMS_RESAMPLING.ENABLED", "True"]))
        for opts, pattern in (
            (["MODEL.RPN.NMS_RESAMPLING.THRESHOLDS", "[0.9, 0.8, 0.0]"], "THRESHOLDS"),
            (["MODEL.RPN.NMS_RESAMPLING.THRESHOLDS", "[0.9, 1.2, 0.7]"], "THRESHOLDS"),
            (["MODEL.RPN.NMS_RESAMPLING.THRESHOLDS", "[0.9, 0.8]"], "THRESHOLDS"),
            (["MODEL.RPN.NMS_RESAMPLING.MODE", "linear"], "MODE"),
            (
                [
                    "MODEL.RPN.NMS_RESAMPLING.ENABLED",
                    "True",
                    "MODEL.PROPOSAL_GENERATOR.NAME",
                    "RPN",
                ],
                "LongTailRPN",
            ),
        ):
            with self.subTest(opts=opts), self.assertRaisesRegex(ConfigError, pattern):
                check_config(load_quickstart(opts))


if __name__ == "__main__":
    unittest.main()
