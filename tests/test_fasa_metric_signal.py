# Copyright (c) fasa_seesaw contributors.
"""FASA's metric adaptation signal: per-category AP on a subset of images, and its direction."""

import json
import numpy as np
import os
import tempfile
import unittest
import torch
from torch import nn

from detectron2.utils.events import EventStorage

from fasa_seesaw.engine import FASAAdaptationHook
from fasa_seesaw.evaluation import per_category_ap
from fasa_seesaw.testing import TOY_COUNTS as COUNTS
from fasa_seesaw.testing import detections_on_gt as detections
from fasa_seesaw.testing import toy_fasa_seesaw_predictor as make_predictor
from fasa_seesaw.testing import toy_lvis_gt as make_gt


def lvis_api(gt):
    from lvis import LVIS

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "gt.json")
        with open(path, "w") as f:
            json.dump(gt, f)
        return LVIS(path)


class TestPerCategoryAP(unittest.TestCase):
    def test_known_values_and_image_subset(self):
        gt = make_gt()
        api = lvis_api(gt)
        np.testing.assert_allclose(per_category_ap(api, detections(gt, 0.9), [1, 2, 3]), [1, 1, 1])
        ap = per_category_ap(api, detections(gt, 0.9, skip_category=3), [1, 2, 3])
        np.testing.assert_allclose(ap, [1.0, 1.0, 0.0])
        # Only images 1 and 2: category 3 has no ground truth there, so no AP.
        ap = per_category_ap(api, detections(gt, 0.9, skip_category=3), [1, 2])
        np.testing.assert_allclose(ap[:2], [1.0, 1.0])
        self.assertTrue(np.isnan(ap[2]))
        self.assertTrue(np.isnan(per_category_ap(api, [], [1, 2, 3])).all())


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.pred = make_predictor()


class TestMetricSignal(unittest.TestCase):
    def test_group_whose_ap_rose_gets_more_draws(self):
        model = _Model()
        model.pred.fasa.probs.fill_(0.5)
        scores = iter(
            [
                np.array([0.2, 0.2, 0.5, 0.5, np.nan, 0.1]),
                np.array([0.4, 0.1, 0.5, 0.6, 0.3, np.nan]),
            ]
        )
        hook = FASAAdaptationHook(
            None, "unused", period=1, clustering="none", metric_fn=lambda m: next(scores)
        )
        with EventStorage(0) as storage:
            hook.trainer = type("T", (), {"model": model, "storage": storage})()
            hook.adapt()
            torch.testing.assert_close(model.pred.fasa.probs, torch.full((len(COUNTS),), 0.5))
            hook.adapt()
            self.assertIn("fasa/val_neg_ap", storage.latest())
        expected = [0.55, 0.45, 0.5, 0.55, 0.5, 0.5]  # rose, fell, same, rose, undefined x2
        np.testing.assert_allclose(model.pred.fasa.probs.numpy(), expected, rtol=1e-6)


if __name__ == "__main__":
    unittest.main()
