# Copyright (c) fasa_seesaw contributors.
"""lvis-api evaluation through the numpy-2 shim, on hand-built cases whose answer is known."""

import json
import numpy as np
import os
import tempfile
import unittest

from fasa_seesaw.evaluation import lvis_numpy2_compat


def make_gt():
    cats = [
        {"id": 1, "name": "a", "frequency": "f", "image_count": 200, "synset": "a.n.01"},
        {"id": 2, "name": "b", "frequency": "c", "image_count": 50, "synset": "b.n.01"},
        {"id": 3, "name": "c", "frequency": "r", "image_count": 3, "synset": "c.n.01"},
    ]
    images, anns = [], []
    boxes = {1: [(10, 10, 20, 20)], 2: [(40, 40, 15, 25)], 3: [(5, 50, 30, 10)]}
    for img_id in (1, 2, 3):
        images.append(
            {
                "id": img_id,
                "height": 100,
                "width": 100,
                "neg_category_ids": [c for c in (1, 2, 3) if c != img_id],
                "not_exhaustive_category_ids": [],
            }
        )
        for x, y, w, h in boxes[img_id]:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": img_id,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                    "iscrowd": 0,
                }
            )
    return {"images": images, "annotations": anns, "categories": cats}


def detections(gt, score, skip_category=None):
    """One detection per ground-truth box, on it exactly."""
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": score,
        }
        for a in gt["annotations"]
        if a["category_id"] != skip_category
    ]


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
