# Copyright (c) fasa_seesaw contributors.
"""lvis-api evaluation through the numpy-2 shim, on hand-built cases whose answer is known."""

import json
import numpy as np
import os
import tempfile
import unittest

from fasa_seesaw.evaluation import lvis_numpy2_compat
from fasa_seesaw.testing import detections_on_gt as detections
from fasa_seesaw.testing import toy_lvis_gt as make_gt


def evaluate(gt, dets):
    from lvis import LVIS, LVISEval, LVISResults

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "gt.json")
        with open(path, "w") as f:
            json.dump(gt, f)
        lvis_gt = LVIS(path)
    with lvis_numpy2_compat():
        ev = LVISEval(lvis_gt, LVISResults(lvis_gt, dets, max_dets=300), "bbox")
        ev.run()
    return ev.get_results()


class TestLVISEvaluation(unittest.TestCase):
    def test_numpy_has_no_float_alias(self):
        # The reason the shim exists; if numpy brings the alias back, the shim is harmless.
        if hasattr(np, "float"):
            self.skipTest("this numpy still has np.float")
        import lvis.eval

        self.assertIs(lvis.eval.np, np)
        with lvis_numpy2_compat():
            self.assertIs(lvis.eval.np.float, float)
            self.assertIs(lvis.eval.np.cumsum, np.cumsum)
        self.assertIs(lvis.eval.np, np)

    def test_perfect_detections_score_one(self):
        gt = make_gt()
        dets = detections(gt, 0.9)
        res = evaluate(gt, dets)
        for key in ("AP", "AP50", "APr", "APc", "APf"):
            self.assertAlmostEqual(res[key], 1.0, places=6, msg=key)

    def test_rare_class_missed(self):
        gt = make_gt()
        dets = detections(gt, 0.9, skip_category=3)
        # A false positive of the rare class on an image where it is a verified negative.
        dets.append({"image_id": 1, "category_id": 3, "bbox": [60, 60, 10, 10], "score": 0.8})
        res = evaluate(gt, dets)
        self.assertAlmostEqual(res["APf"], 1.0, places=6)
        self.assertAlmostEqual(res["APc"], 1.0, places=6)
        self.assertAlmostEqual(res["APr"], 0.0, places=6)
        self.assertAlmostEqual(res["AP"], 2.0 / 3.0, places=6)

    def test_unlisted_category_detection_is_ignored(self):
        # Federated rule: a detection of a class that is neither present nor a verified negative
        # in that image does not count as a false positive.
        gt = make_gt()
        gt["images"][0]["neg_category_ids"] = []
        dets = detections(gt, 0.5)
        dets.append({"image_id": 1, "category_id": 2, "bbox": [70, 70, 10, 10], "score": 0.99})
        self.assertAlmostEqual(evaluate(gt, dets)["APc"], 1.0, places=6)


if __name__ == "__main__":
    unittest.main()
