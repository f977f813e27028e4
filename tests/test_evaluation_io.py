# Copyright (c) fasa_seesaw contributors.
"""
The evaluation layer's inputs and outputs: one-line errors for bad results and ground truth
(also from tools/evaluate_lvis.py, which never overwrites) and the per-category CSV.
"""

import copy
import csv
import json
import numpy as np
import os
import subprocess
import sys
import tempfile
import unittest
import pytest

from fasa_seesaw.evaluation import (
    EmptyResultsError,
    EvaluationInputError,
    evaluate_lvis,
    evaluate_report,
)
from fasa_seesaw.testing import lvis_api_reference, random_lvis_case

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TestBadInput(unittest.TestCase):
    def setUp(self):
        self.gt, self.dets = random_lvis_case(8, num_images=4, big_image_dets=5)

    def check(self, results, iou_type, *words, gt=None, exc=EvaluationInputError):
        with self.assertRaises(exc) as cm:
            evaluate_lvis(gt or self.gt, results, iou_type)
        for w in words:
            self.assertIn(w, str(cm.exception))

    def test_errors_name_the_problem(self):
        d = copy.deepcopy(self.dets)
        d[3]["image_id"] = 999
        self.check(d, "bbox", "image ids", "999")
        d = copy.deepcopy(self.dets)
        d[0]["category_id"] = 77
        self.check(d, "bbox", "category ids", "77")
        self.check([], "bbox", "no detections", exc=EmptyResultsError)
        d = copy.deepcopy(self.dets)
        d[2]["score"] = float("nan")
        self.check(d, "bbox", "non-finite score", "index 2")
        masks_only = [{k: v for k, v in r.items() if k != "bbox"} for r in self.dets]
        self.check(masks_only, "bbox", "mask results", "--iou-type segm")
        boxes_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in self.dets]
        self.check(boxes_only, "segm", "box results", "--iou-type bbox")
        no_freq = copy.deepcopy(self.gt)
        del no_freq["categories"][0]["frequency"]
        self.check(self.dets, "bbox", "frequency", gt=no_freq, exc=ValueError)

    def test_malformed_fields_are_named(self):
        for field, value, words in (
            ("score", "0.9", "score '0.9' is not a number"),
            ("score", None, "score None is not a number"),
            ("bbox", [1.0, 2.0, 3.0], "bbox [1.0, 2.0, 3.0] is not 4 numbers"),
            ("bbox", [1.0, 2.0, "3", 4.0], "is not 4 numbers"),
            ("image_id", "1", "image_id '1' is not an integer"),
        ):
            with self.subTest(field=field, value=value):
                d = copy.deepcopy(self.dets)
                d[1][field] = value
                self.check(d, "bbox", "1 of", "malformed", "index 1", words)

    def test_ground_truth_without_the_federated_lists_is_refused(self):
        # As train_net.py refuses it, rather than guessing the lists (empty ones ignore every
        # detection of a category absent from an image).
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            with self.subTest(key=key):
                gt = copy.deepcopy(self.gt)
                del gt["images"][0][key]
                self.check(self.dets, "bbox", "1 images lack", "add_frequency", gt=gt)

    @pytest.mark.slow  # subprocesses
    def test_command_line(self):
        with tempfile.TemporaryDirectory() as d:
            gt_path, res_path = os.path.join(d, "gt.json"), os.path.join(d, "res.json")
            with open(gt_path, "w") as f:
                json.dump(self.gt, f)
            bad = copy.deepcopy(self.dets)
            bad[0]["score"] = float("nan")
            with open(res_path, "w") as f:
                json.dump(bad, f)
            cmd = [sys.executable, os.path.join(REPO, "tools", "evaluate_lvis.py"), gt_path]
            p = subprocess.run(cmd + [res_path], capture_output=True, text=True)
            self.assertNotEqual(p.returncode, 0)
            self.assertIn("error: ", p.stderr)
            self.assertNotIn("Traceback", p.stderr)
            with open(res_path, "w") as f:
                json.dump(self.dets, f)
            out = os.path.join(d, "out")
            p = subprocess.run(cmd + [res_path, "--out", out], capture_output=True, text=True)
            self.assertEqual(p.returncode, 0, p.stderr[-2000:])
            with open(os.path.join(out, "lvis_metrics.json")) as f:
                metrics = json.load(f)
            ref, _, _ = lvis_api_reference(self.gt, self.dets, "segm")
            self.assertAlmostEqual(metrics["segm"]["AP"], ref["AP"], places=6)
            for key in ("AP_fixed", "AP_pool", "TIDE_Cls", "APr"):
                self.assertIn(key, metrics["bbox"])
            # a second run keeps the first run's files
            p = subprocess.run(cmd + [res_path, "--out", out], capture_output=True, text=True)
            self.assertEqual(p.returncode, 0)
            self.assertTrue(os.path.exists(os.path.join(out, "lvis_metrics.1.json")))


class TestPerCategoryCsv(unittest.TestCase):
    def test_rows(self):
        gt, dets = random_lvis_case(9, num_images=5, big_image_dets=5)
        with tempfile.TemporaryDirectory() as d:
            train = copy.deepcopy(gt)  # train counts from a "training json"
            train_path = os.path.join(d, "train.json")
            with open(train_path, "w") as f:
                json.dump(train, f)
            res = evaluate_report(
                gt, dets, ("bbox",), extras=(), out_dir=d, train_json=train_path, figures=False
            )
            with open(os.path.join(d, "per_category_ap_bbox.csv")) as f:
                rows = list(csv.DictReader(f))
        self.assertEqual([int(r["category_id"]) for r in rows], list(range(1, 9)))
        ref = evaluate_lvis(gt, dets, "bbox")
        for r, ap in zip(rows, ref.per_category_ap):
            cat = int(r["category_id"])
            n_img = len({a["image_id"] for a in gt["annotations"] if a["category_id"] == cat})
            self.assertEqual(int(r["train_images"]), n_img)
            self.assertEqual(r["frequency"], gt["categories"][cat - 1]["frequency"])
            if np.isnan(ap):
                self.assertEqual(r["ap"], "")
            else:
                self.assertAlmostEqual(float(r["ap"]), ap, places=3)
        self.assertAlmostEqual(res["bbox"]["AP"], ref.metrics["AP"])

    def test_figure_file_and_tensorboard_image(self):
        from detectron2.utils.events import EventStorage

        gt, dets = random_lvis_case(9, num_images=5, big_image_dets=5)
        for c in gt["categories"]:
            c["image_count"] = c["id"] * 3  # training image counts carried by the json
        with tempfile.TemporaryDirectory() as d, EventStorage(0) as storage:
            evaluate_report(gt, dets, ("bbox",), extras=(), out_dir=d)
            self.assertTrue(os.path.getsize(os.path.join(d, "per_category_ap_bbox.png")) > 0)
            names = [name for name, _, _ in storage._vis_data]
            self.assertEqual(names, ["per_category_ap/bbox"])
            self.assertEqual(storage._vis_data[0][1].shape[0], 3)


if __name__ == "__main__":
    unittest.main()
