# Copyright (c) fasa_seesaw contributors.
"""
The project's ROI heads against detectron2's: the same initial weights from the same seed (the
box predictor is built once, in detectron2's order), and top-K-per-class inference through the
predictor's score floor in the single-stage and the cascade head.
"""

import os
import unittest
import torch

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model

from fasa_seesaw import add_fasa_seesaw_config
from fasa_seesaw.config import merge_config
from fasa_seesaw.data import prepare_datasets
from fasa_seesaw.evaluation.topk_inference import per_class_score_floor
from fasa_seesaw.testing import SMOKE_OPTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart")
SMOKE = SMOKE_OPTS


def cfg_of(name, *opts):
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    return merge_config(cfg, os.path.join(QUICKSTART, name), SMOKE + list(opts))


def built(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg)


class TestInitialWeights(unittest.TestCase):
    def test_same_weights_as_detectron2s_heads(self):
        for ours, theirs, opts in (
            ("LongTailROIHeads", "StandardROIHeads", []),
            (
                "LongTailCascadeROIHeads",
                "CascadeROIHeads",
                ["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"],
            ),
        ):
            with self.subTest(head=ours):
                a = built(
                    cfg_of(
                        "mask_rcnn_R_18_FPN_ce_quickstart.yaml", "MODEL.ROI_HEADS.NAME", ours, *opts
                    )
                )
                b = built(
                    cfg_of(
                        "mask_rcnn_R_18_FPN_ce_quickstart.yaml",
                        "MODEL.ROI_HEADS.NAME",
                        theirs,
                        *opts
                    )
                )
                sa, sb = a.state_dict(), b.state_dict()
                self.assertEqual(list(sa), list(sb))
                for k in sa:
                    self.assertTrue(torch.equal(sa[k], sb[k]), k)
                # and a different seed draws other weights, so the comparison can fail
                c = built(
                    cfg_of(
                        "mask_rcnn_R_18_FPN_ce_quickstart.yaml", "MODEL.ROI_HEADS.NAME", ours, *opts
                    ),
                    seed=1,
                )
                k = next(k for k in sa if k.endswith("cls_score.weight"))
                self.assertFalse(torch.equal(c.state_dict()[k], sa[k]))


class TestScoreFloor(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        prepare_datasets(["longtail_synth_smoke_val"])
        cfg = cfg_of("mask_rcnn_R_18_FPN_ce_quickstart.yaml")
        mapper = DatasetMapper(cfg, is_train=False)
        cls.inputs = [mapper(d) for d in DatasetCatalog.get("longtail_synth_smoke_val")[:2]]

    def infer(self, model, floor=None, cap=-1):
        model.eval()
        with torch.no_grad():
            if floor is None:
                return [o["instances"] for o in model(self.inputs)]
            with per_class_score_floor(model, floor, cap):
                return [o["instances"] for o in model(self.inputs)]

    def check(self, model):
        plain = self.infer(model)
        classes = torch.cat([i.pred_classes for i in plain])
        self.assertGreater(len(classes), 0)
        cap = model.roi_heads.box_predictor
        cap = (cap[-1] if isinstance(cap, torch.nn.ModuleList) else cap).test_topk_per_image
        # A zero floor with the usual cap changes nothing ...
        for a, b in zip(plain, self.infer(model, lambda C: torch.zeros(C), cap)):
            torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor)
            torch.testing.assert_close(a.scores, b.scores)
            self.assertTrue(torch.equal(a.pred_classes, b.pred_classes))
        # ... and a floor of 1 on the most detected class removes it and nothing else.
        top = int(classes.mode().values)
        floor = torch.zeros(12)
        floor[top] = 1.0
        for a, b in zip(plain, self.infer(model, lambda C: floor[:C], cap)):
            self.assertFalse((b.pred_classes == top).any())
            keep = a.pred_classes != top
            # the rest keeps its order; the per-image cap then admits lower-scoring boxes
            torch.testing.assert_close(b.scores[: int(keep.sum())], a.scores[keep])

    def test_single_stage(self):
        self.check(built(cfg_of("mask_rcnn_R_18_FPN_seesaw_quickstart.yaml")))

    def test_cascade(self):
        self.check(built(cfg_of("cascade_mask_rcnn_R_18_FPN_seesaw_quickstart.yaml")))


if __name__ == "__main__":
    unittest.main()
