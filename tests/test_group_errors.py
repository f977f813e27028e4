# Copyright (c) fasa_seesaw contributors.
"""
tools/group_errors.py: each detection of a hand-made case gets the type worked out by hand (true
positive, a confusion with another class's object, background, a duplicate), only detections of
classes the image verified are typed, an unmatched detection of a class the image does not label
exhaustively is ignored, and the score threshold and per-image cap apply.
"""

import json
import os
import tempfile
import unittest


def _case():
    cats = [
        {"id": 1, "name": "a", "frequency": "r"},
        {"id": 2, "name": "b", "frequency": "c"},
        {"id": 3, "name": "c", "frequency": "f"},
    ]
    images = [
        {
            "id": 1,
            "width": 200,
            "height": 200,
            "neg_category_ids": [1],
            "not_exhaustive_category_ids": [],
        },
        {
            "id": 2,
            "width": 200,
            "height": 200,
            "neg_category_ids": [],
            "not_exhaustive_category_ids": [3],
        },
    ]
    anns = [  # image 1: a frequent object; image 2: a rare and a common object
        {
            "id": 1,
            "image_id": 1,
            "category_id": 3,
            "bbox": [10, 10, 50, 50],
            "area": 2500,
            "iscrowd": 0,
        },
        {
            "id": 2,
            "image_id": 2,
            "category_id": 1,
            "bbox": [100, 100, 40, 40],
            "area": 1600,
            "iscrowd": 0,
        },
        {
            "id": 3,
            "image_id": 2,
            "category_id": 2,
            "bbox": [10, 10, 40, 40],
            "area": 1600,
            "iscrowd": 0,
        },
    ]
    anns.append(  # a frequent object in image 2, whose frequent class is not exhaustive there
        {
            "id": 4,
            "image_id": 2,
            "category_id": 3,
            "bbox": [150, 150, 40, 40],
            "area": 1600,
            "iscrowd": 0,
        }
    )
    gt = {"images": images, "annotations": anns, "categories": cats}

    def det(image, cat, box, score):
        return {"image_id": image, "category_id": cat, "bbox": box, "score": score}

    dets = [
        det(1, 1, [10, 10, 50, 50], 0.9),  # rare on the frequent object: cls (1 is a negative)
        det(1, 1, [150, 150, 30, 30], 0.8),  # rare on background: bkg
        det(1, 3, [12, 10, 50, 50], 0.7),  # frequent: tp
        det(1, 2, [10, 10, 50, 50], 0.9),  # common, not verified in image 1: not typed
        det(2, 1, [100, 100, 40, 40], 0.6),  # rare: tp
        det(2, 1, [101, 100, 40, 40], 0.5),  # its duplicate: other
        det(2, 1, [10, 10, 40, 40], 0.4),  # rare on the common object: cls
        det(2, 2, [10, 10, 40, 40], 0.2),  # common tp, but below the score threshold
        det(2, 3, [150, 10, 40, 40], 0.45),  # frequent on background, class not exhaustive: ignored
        det(2, 3, [150, 150, 40, 40], 0.35),  # frequent tp in image 2
    ]
    return gt, dets


class TestGroupErrors(unittest.TestCase):
    def test_hand_typed_case(self):
        ge = self.load_tool("group_errors")
        gt, dets = _case()
        out = ge.group_errors(gt, dets, score=0.3)
        self.assertEqual(out["r"], {"n": 5, "tp": 1, "cls": 2, "bkg": 1, "other": 1, "gt": 1})
        self.assertEqual(out["c"], {"n": 0, "tp": 0, "cls": 0, "bkg": 0, "other": 0, "gt": 1})
        self.assertEqual(out["f"], {"n": 2, "tp": 2, "cls": 0, "bkg": 0, "other": 0, "gt": 2})
        low = ge.group_errors(gt, dets, score=0.0)
        self.assertEqual((low["c"]["n"], low["c"]["tp"]), (1, 1))
        # the cap keeps each image's highest scores: in image 2 only the rare tp (0.6)
        capped = ge.group_errors(gt, dets, score=0.0, max_dets=1)
        self.assertEqual((capped["r"]["n"], capped["r"]["tp"], capped["r"]["cls"]), (2, 1, 1))

    def test_command_line_and_bad_input(self):
        ge = self.load_tool("group_errors")
        gt, dets = _case()
        with tempfile.TemporaryDirectory() as d:
            gt_path = os.path.join(d, "gt.json")
            with open(gt_path, "w") as f:
                json.dump(gt, f)
            run = os.path.join(d, "runs", "x", "seed0")
            os.makedirs(os.path.join(run, "inference", "ds"))
            with open(os.path.join(run, "inference", "ds", ge.RESULTS), "w") as f:
                json.dump(dets, f)
            md = os.path.join(d, "out.md")
            rc = ge.main(["--study", d, "--dataset", "ds", "--gt", gt_path, "--md", md])
            self.assertEqual(rc, 0)
            with open(md) as f:
                text = f.read()
            self.assertIn("| x (1 seeds, mean) | 5 | 1 / 1 | 2 | 1 |", text)
            self.assertEqual(ge.main([run, "--dataset", "other", "--gt", gt_path]), 2)
            with open(os.path.join(run, "inference", "ds", ge.RESULTS), "w") as f:
                json.dump(
                    dets + [{"image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1], "score": 1}], f
                )
            self.assertEqual(ge.main([run, "--dataset", "ds", "--gt", gt_path]), 2)
            del gt["categories"][0]["frequency"]  # not an LVIS v1 json
            with open(gt_path, "w") as f:
                json.dump(gt, f)
            with self.assertRaisesRegex(ge.ToolError, "needs a 'frequency'"):
                ge.group_errors(gt, dets)
            self.assertEqual(ge.main([run, "--dataset", "ds", "--gt", gt_path]), 2)


if __name__ == "__main__":
    unittest.main()
