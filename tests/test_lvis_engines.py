# Copyright (c) fasa_seesaw contributors.
"""
The LVIS evaluation layer: the fast engine (hotcoco) against the official lvis-api, AP-Fixed and
AP-Pool against hand-worked answers from their definitions, TIDE's baseline, the per-category CSV,
and the errors bad inputs get.
"""

import copy
import csv
import json
import logging
import numpy as np
import os
import subprocess
import sys
import tempfile
import unittest
import pycocotools.mask as mask_util

from fasa_seesaw.evaluation import (
    EmptyResultsError,
    EvaluationInputError,
    TopKPerClass,
    ap_fixed,
    ap_pool,
    cap_per_class,
    evaluate_lvis,
    evaluate_report,
    lvis_numpy2_compat,
    tide_errors,
)
from fasa_seesaw.evaluation.lvis_engines import cap_per_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W, H = 160, 120


def _poly(x, y, w, h):
    return [x + w / 2, y, x + w, y + h / 3, x + w, y + 2 * h / 3, x + w / 2, y + h, x, y + h / 2]


def _rle(poly):
    rle = mask_util.merge(mask_util.frPyObjects([poly], H, W))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def make_case(seed, num_images=8, big_image_dets=340, ties=True):
    """
    A small LVIS-format ground truth and detections with the federated corner cases: images with
    neg_category_ids and not_exhaustive_category_ids, an image without ground truth but with a
    negative list (its detections are false positives), an image without ground truth or lists
    (its detections are not evaluated), a category without ground truth, one image with more
    than 300 detections, tied scores. Detections carry both bbox and an RLE segmentation.
    """
    rng = np.random.default_rng(seed)
    freqs = ["r", "c", "f", "r", "c", "f", "c", "r"]
    cats = [{"id": i + 1, "name": f"cat{i + 1}", "frequency": f} for i, f in enumerate(freqs)]
    images, anns, gts = [], [], {}
    aid = 1
    for im in range(1, num_images + 1):
        boxes = []
        if im < num_images - 1:
            for _ in range(int(rng.integers(2, 6))):
                c = int(rng.choice([1, 2, 3, 5, 6, 8]))
                w, h = float(rng.uniform(8, 100)), float(rng.uniform(8, 90))
                x, y = float(rng.uniform(0, W - w)), float(rng.uniform(0, H - h))
                poly = _poly(x, y, w, h)
                area = float(mask_util.area(_rle(poly)))
                anns.append(
                    {
                        "id": aid,
                        "image_id": im,
                        "category_id": c,
                        "bbox": [x, y, w, h],
                        "area": area,
                        "segmentation": [poly],
                        "iscrowd": 0,
                    }
                )
                boxes.append((c, [x, y, w, h]))
                aid += 1
        present = sorted({c for c, _ in boxes})
        others = [c for c in range(1, 9) if c not in present]
        neg = sorted(int(c) for c in rng.choice(others, size=2, replace=False))
        images.append(
            {
                "id": im,
                "width": W,
                "height": H,
                "file_name": f"{im}.jpg",
                "neg_category_ids": neg,
                "not_exhaustive_category_ids": present[:1],
            }
        )
        gts[im] = boxes
    images[num_images - 2]["neg_category_ids"] = [1, 4]  # no GT; category 4 never has GT
    images[num_images - 1]["neg_category_ids"] = []  # no GT, no lists: detections not evaluated
    gt = {"images": images, "annotations": anns, "categories": cats}

    dets = []
    decimals = 1 if ties else 6

    def add(im, c, box, score):
        x, y, w, h = box
        x, y = min(max(x, 0.0), W - 2), min(max(y, 0.0), H - 2)
        w, h = max(2.0, min(w, W - x)), max(2.0, min(h, H - y))
        dets.append(
            {
                "image_id": im,
                "category_id": c,
                "bbox": [x, y, w, h],
                "score": float(np.round(score, decimals)),
                "segmentation": _rle(_poly(x, y, w, h)),
            }
        )

    for im in range(1, num_images + 1):
        for c, b in gts[im]:
            for _ in range(int(rng.integers(1, 4))):
                j = rng.normal(0, 4, 4)
                cc = c if rng.random() < 0.8 else int(rng.integers(1, 9))
                add(
                    im,
                    cc,
                    [b[0] + j[0], b[1] + j[1], b[2] + j[2], b[3] + j[3]],
                    rng.uniform(0.1, 1),
                )
        for _ in range(big_image_dets if im == 1 else int(rng.integers(3, 10))):
            w, h = float(rng.uniform(5, 60)), float(rng.uniform(5, 60))
            box = [float(rng.uniform(0, W - w)), float(rng.uniform(0, H - h)), w, h]
            add(im, int(rng.integers(1, 9)), box, rng.uniform(0.01, 0.9))
    dets = [dets[i] for i in rng.permutation(len(dets))]
    return gt, dets


def reference_lvis_api(gt, dets, iou_type, max_dets=300):
    """The official tool, used the way detectron2 uses it (segm results without bbox)."""
    from lvis import LVIS, LVISEval, LVISResults

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "gt.json")
        with open(path, "w") as f:
            json.dump(gt, f)
        lvis_gt = LVIS(path)
    res = copy.deepcopy(dets)
    if iou_type == "segm":
        for r in res:
            r.pop("bbox", None)
    else:
        for r in res:
            r.pop("segmentation", None)
    with lvis_numpy2_compat():
        ev = LVISEval(lvis_gt, LVISResults(lvis_gt, res, max_dets=max_dets), iou_type)
        ev.run()
    precision = ev.eval["precision"][:, :, :, 0]
    per_cat = []
    for k in range(precision.shape[2]):
        p = precision[:, :, k]
        per_cat.append(p[p > -1].mean() * 100 if (p > -1).any() else np.nan)
    metrics = {k: (np.nan if v == -1 else v * 100) for k, v in ev.results.items()}
    return metrics, np.array(per_cat), ev


def assert_metrics_equal(tc, a, b, tol=1e-6):
    tc.assertEqual(sorted(a), sorted(b))
    for k in a:
        if np.isnan(a[k]) or np.isnan(b[k]):
            tc.assertTrue(np.isnan(a[k]) and np.isnan(b[k]), k)
        else:
            tc.assertAlmostEqual(a[k], b[k], delta=tol, msg=k)


class TestEngineParity(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        logging.getLogger("lvis").setLevel(logging.ERROR)

    def test_engines_agree_with_the_reference(self):
        for seed, ties in ((0, True), (1, False), (2, True)):
            gt, dets = make_case(seed, ties=ties)
            self.assertGreater(sum(d["image_id"] == 1 for d in dets), 300)
            for iou_type in ("bbox", "segm"):
                with self.subTest(seed=seed, iou_type=iou_type):
                    ref, ref_cat, _ = reference_lvis_api(gt, dets, iou_type)
                    for engine in ("hotcoco", "lvis"):
                        out = evaluate_lvis(gt, dets, iou_type, engine)
                        assert_metrics_equal(self, out.metrics, ref)
                        np.testing.assert_allclose(
                            out.per_category_ap, ref_cat, atol=1e-6, rtol=0, equal_nan=True
                        )
                    # the corner cases are really exercised
                    self.assertTrue(np.isnan(ref_cat[3]))  # category 4: no GT
                    self.assertFalse(np.isnan(ref["APr"]))

    def test_array_results_equal_dict_results(self):
        gt, dets = make_case(10, ties=True)
        arr = np.array(
            [[d["image_id"], *d["bbox"], d["score"], d["category_id"]] for d in dets], dtype=float
        )
        ref, ref_cat, _ = reference_lvis_api(gt, dets, "bbox")
        for engine in ("hotcoco", "lvis"):
            out = evaluate_lvis(gt, arr, "bbox", engine)
            assert_metrics_equal(self, out.metrics, ref)
            np.testing.assert_allclose(out.per_category_ap, ref_cat, atol=1e-6, equal_nan=True)
        for max_dets in (300, 5):
            kept = cap_per_image(arr, max_dets)
            ref_kept = cap_per_image(dets, max_dets)
            self.assertEqual(
                sorted(map(tuple, kept.tolist())),
                sorted((d["image_id"], *d["bbox"], d["score"], d["category_id"]) for d in ref_kept),
            )
        a, short_a = cap_per_class(arr, 20)
        b, short_b = cap_per_class(dets, 20)
        self.assertEqual(short_a, short_b)
        self.assertEqual(
            sorted(map(tuple, a.tolist())),
            sorted((d["image_id"], *d["bbox"], d["score"], d["category_id"]) for d in b),
        )
        with self.assertRaises(EvaluationInputError):
            evaluate_lvis(gt, arr[:, :6], "bbox")
        with self.assertRaises(EvaluationInputError):
            evaluate_lvis(gt, arr, "segm")

    def test_no_per_image_cap_many_detections_of_one_class(self):
        """Over 300 detections of one class in one image (AP-Fixed/AP-Pool lift the per-image
        cap): the true positive scored last still counts in both engines."""
        gt, box_a, box_b = _gt_two_classes()
        rng = np.random.default_rng(0)
        decoys = [
            {"image_id": 1, "category_id": 1, "score": 0.9 - i * 1e-4,
             "bbox": [float(rng.uniform(60, 120)), 60.0, 20.0, 20.0]}
            for i in range(400)
        ]  # fmt: skip
        dets = decoys + [{"image_id": 1, "category_id": 1, "bbox": box_a, "score": 0.01}]
        ref = evaluate_lvis(gt, dets, "bbox", "lvis", max_dets=-1)
        fast = evaluate_lvis(gt, dets, "bbox", "hotcoco", max_dets=-1)
        self.assertGreater(ref.per_category_ap[0], 0.0)
        assert_metrics_equal(self, fast.metrics, ref.metrics)
        np.testing.assert_allclose(fast.per_category_ap, ref.per_category_ap, equal_nan=True)
        for engine in ("hotcoco", "lvis"):
            m = ap_fixed(gt, dets, "bbox", k=10**4, engine=engine)
            self.assertAlmostEqual(m["AP_fixed"], ref.metrics["AP"], places=6)

    def test_segm_results_carrying_bbox_use_mask_area(self):
        gt, dets = make_case(3)
        with_box = evaluate_lvis(gt, dets, "segm", "hotcoco")
        without = [{k: v for k, v in d.items() if k != "bbox"} for d in dets]
        assert_metrics_equal(self, with_box.metrics, evaluate_lvis(gt, without, "segm").metrics)

    def test_per_image_cap_matches_lvis_api(self):
        from lvis.results import LVISResults

        gt, dets = make_case(4, ties=True)
        for max_dets in (300, 7, 1):
            ours = cap_per_image(dets, max_dets)
            theirs = LVISResults.limit_dets_per_image(None, copy.deepcopy(dets), max_dets)
            key = [(d["image_id"], d["category_id"], d["score"], tuple(d["bbox"])) for d in ours]
            ref = [(d["image_id"], d["category_id"], d["score"], tuple(d["bbox"])) for d in theirs]
            self.assertEqual(key, ref)

    def test_subset_of_images(self):
        gt, dets = make_case(5)
        ids = [1, 2, 3]
        for engine in ("hotcoco", "lvis"):
            out = evaluate_lvis(gt, dets, "bbox", engine, img_ids=ids)
            self.assertEqual(out.img_ids, ids)
        a = evaluate_lvis(gt, dets, "bbox", "hotcoco", img_ids=ids)
        b = evaluate_lvis(gt, dets, "bbox", "lvis", img_ids=ids)
        assert_metrics_equal(self, a.metrics, b.metrics)


def _gt_two_classes():
    cats = [
        {"id": 1, "name": "a", "frequency": "f"},
        {"id": 2, "name": "b", "frequency": "r"},
        {"id": 3, "name": "c", "frequency": "c"},
    ]
    images = [
        {
            "id": 1,
            "width": W,
            "height": H,
            "neg_category_ids": [3],
            "not_exhaustive_category_ids": [],
        },
        {
            "id": 2,
            "width": W,
            "height": H,
            "neg_category_ids": [],
            "not_exhaustive_category_ids": [],
        },
    ]
    box_a, box_b = [10.0, 10.0, 40.0, 30.0], [60.0, 50.0, 50.0, 40.0]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": box_a, "area": 1200.0},
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": box_b, "area": 2000.0},
    ]
    return {"images": images, "annotations": anns, "categories": cats}, box_a, box_b


class TestFixedAndPool(unittest.TestCase):
    """Hand-worked cases from the definitions (Dave et al. 2021)."""

    def test_ap_fixed_lifts_the_per_image_cap_and_caps_per_class(self):
        gt, box_a, box_b = _gt_two_classes()
        far = [120.0, 90.0, 30.0, 20.0]
        dets = [
            {"image_id": 1, "category_id": 1, "bbox": far, "score": 0.9},  # FP
            {"image_id": 1, "category_id": 1, "bbox": box_a, "score": 0.8},  # TP
            {"image_id": 2, "category_id": 2, "bbox": box_b, "score": 0.7},  # TP
        ]
        # standard AP with a per-image cap of 1: class a keeps only its FP -> AP_a = 0
        std = evaluate_lvis(gt, dets, "bbox", max_dets=1)
        self.assertAlmostEqual(std.per_category_ap[0], 0.0)
        for engine in ("hotcoco", "lvis"):
            # AP-Fixed, no per-image cap: a = [FP, TP] -> precision 1/2 at recall 1 -> 0.5;
            # b = 1.0; mean 0.75
            m = ap_fixed(gt, dets, "bbox", k=10, engine=engine)
            self.assertAlmostEqual(m["AP_fixed"], 75.0, places=6)
            self.assertAlmostEqual(m["APf_fixed"], 50.0, places=6)
            self.assertAlmostEqual(m["APr_fixed"], 100.0, places=6)
            self.assertEqual(m["classes_below_K"], 2)
            # K = 1: class a keeps only its best-scoring detection (the FP) -> 0; b stays 1.0
            m1 = ap_fixed(gt, dets, "bbox", k=1, engine=engine)
            self.assertAlmostEqual(m1["AP_fixed"], 50.0, places=6)

    def test_ap_pool_ranks_all_classes_together(self):
        gt, box_a, box_b = _gt_two_classes()
        far = [0.0, 80.0, 30.0, 30.0]
        dets = [
            {"image_id": 1, "category_id": 1, "bbox": box_a, "score": 0.9},  # TP (a)
            {"image_id": 2, "category_id": 2, "bbox": far, "score": 0.5},  # FP (b)
            {"image_id": 2, "category_id": 2, "bbox": box_b, "score": 0.3},  # TP (b)
            # class c is not verified in image 2: dropped by the federated rule
            {"image_id": 2, "category_id": 3, "bbox": far, "score": 0.95},
            # class c is a verified negative of image 1 without GT anywhere: an FP in the pool
            {"image_id": 1, "category_id": 3, "bbox": far, "score": 0.1},
        ]
        # pooled ranking: TP .9, FP .5, TP .3, FP .1 over 2 positives -> recall .5 at precision
        # 1, recall 1 at precision 2/3; 101-point interpolation: 51 points (r <= .5) at 1 and 50
        # at 2/3
        expected_all = (51 * 1.0 + 50 * (2 / 3)) / 101 * 100
        for engine in ("hotcoco", "lvis"):
            m = ap_pool(gt, dets, "bbox", k=10, engine=engine)
            self.assertAlmostEqual(m["AP_pool"], expected_all, places=6)
            self.assertAlmostEqual(m["AP_pool_r"], 50.0, places=6)  # b alone: FP then TP
            self.assertAlmostEqual(m["AP_pool_f"], 100.0, places=6)
            self.assertTrue(np.isnan(m["AP_pool_c"]))  # no GT in the pool
            # standard AP of the same detections: mean of 1.0 and 0.5
            self.assertAlmostEqual(evaluate_lvis(gt, dets, "bbox", engine).metrics["AP"], 75.0)

    def test_single_category_pool_is_that_category_ap(self):
        gt, dets = make_case(6, ties=False)
        for c in gt["categories"]:
            c["frequency"] = "r" if c["id"] == 3 else "f"
        pooled = ap_pool(gt, dets, "bbox", k=10**6)["AP_pool_r"]
        std = evaluate_lvis(gt, dets, "bbox", max_dets=-1, area_rng=[[0, 1e10]])
        self.assertAlmostEqual(pooled, std.per_category_ap[2], places=6)

    def test_cap_per_class_and_streaming_top_k(self):
        rng = np.random.default_rng(0)
        stream = [
            {
                "category_id": int(rng.integers(1, 5)),
                "score": float(np.round(rng.random(), 1)),
                "i": i,
            }
            for i in range(500)
        ]
        capped, short = cap_per_class(stream, 20)
        for c in range(1, 5):
            mine = [r for r in capped if r["category_id"] == c]
            allc = [r for r in stream if r["category_id"] == c]
            ref = sorted(allc, key=lambda r: -r["score"])[:20]  # stable: file order on ties
            self.assertEqual([r["i"] for r in mine], [r["i"] for r in ref])
        self.assertEqual(short, {})
        store = TopKPerClass(20)
        store.add(stream)
        self.assertEqual(sorted(r["i"] for r in store.results()), sorted(r["i"] for r in capped))
        # two "processes" merged give the same set as one stream
        a, b = TopKPerClass(20), TopKPerClass(20)
        a.add(stream[:250])
        b.add(stream[250:])
        merged = TopKPerClass(20)
        merged.merge([a, b])
        self.assertEqual(sorted(r["i"] for r in merged.results()), sorted(r["i"] for r in capped))


class TestTide(unittest.TestCase):
    def test_baseline_is_lvis_ap50_and_errors_are_typed(self):
        gt, dets = make_case(7)
        ref, _, _ = reference_lvis_api(gt, dets, "bbox")
        t = tide_errors(gt, dets, "bbox")
        self.assertAlmostEqual(t["TIDE_AP50"], ref["AP50"], places=9)
        for k in ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss"):
            self.assertGreaterEqual(t[f"TIDE_{k}"], 0.0)

    def test_report_equals_the_separate_computations(self):
        """evaluate_report shares work (one top-K cut for AP-Fixed and AP-Pool; TIDE from the
        standard hotcoco evaluation); its numbers equal each metric computed on its own."""
        gt, dets = make_case(11)
        for engine in ("hotcoco", "lvis"):
            rep = evaluate_report(gt, dets, ("bbox",), engine=engine, fixed_k=50)["bbox"]
            alone = {}
            alone.update(ap_fixed(gt, dets, "bbox", 50, engine))
            alone.update(ap_pool(gt, dets, "bbox", 50, engine))
            alone.update(tide_errors(gt, dets, "bbox"))
            for key, value in alone.items():
                if isinstance(value, float) and np.isnan(value):
                    self.assertTrue(np.isnan(rep[key]), key)
                else:
                    self.assertAlmostEqual(rep[key], value, places=9, msg=(engine, key))

    def test_a_confusion_is_a_class_error(self):
        gt, box_a, box_b = _gt_two_classes()
        gt["images"][0]["neg_category_ids"] = [2, 3]
        dets = [
            {"image_id": 1, "category_id": 2, "bbox": box_a, "score": 0.9},  # right box, class b
            {"image_id": 2, "category_id": 2, "bbox": box_b, "score": 0.8},  # TP
        ]
        t = tide_errors(gt, dets, "bbox")
        self.assertEqual(t["TIDE_count_Cls"], 1)
        self.assertEqual(t["TIDE_count_Bkg"], 0)
        self.assertGreater(t["TIDE_Cls"], 0)


class TestBadInput(unittest.TestCase):
    def setUp(self):
        self.gt, self.dets = make_case(8, num_images=4, big_image_dets=5)

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
            ref, _, _ = reference_lvis_api(self.gt, self.dets, "segm")
            self.assertAlmostEqual(metrics["segm"]["AP"], ref["AP"], places=6)
            for key in ("AP_fixed", "AP_pool", "TIDE_Cls", "APr"):
                self.assertIn(key, metrics["bbox"])
            # a second run keeps the first run's files
            p = subprocess.run(cmd + [res_path, "--out", out], capture_output=True, text=True)
            self.assertEqual(p.returncode, 0)
            self.assertTrue(os.path.exists(os.path.join(out, "lvis_metrics.1.json")))


class TestEvalConfig(unittest.TestCase):
    def test_bad_eval_settings_are_refused_before_training(self):
        from detectron2.config import get_cfg

        from fasa_seesaw import add_fasa_seesaw_config
        from fasa_seesaw.engine.checks import check_eval
        from fasa_seesaw.errors import ConfigError

        cfg = get_cfg()
        add_fasa_seesaw_config(cfg)
        check_eval(cfg.TEST.LVIS)  # defaults are fine
        for key, value, words in (
            ("ENGINE", "fast", "ENGINE"),
            ("EXTRAS", ["fixed", "tidy"], "tidy"),
            ("FIXED_K", 0, "FIXED_K"),
            ("TOPK_PER_CLASS", 10, "below FIXED_K"),
            ("TOPK_MAX_PER_IMAGE", 0, "TOPK_MAX_PER_IMAGE"),
        ):
            c = cfg.clone()
            c.TEST.LVIS[key] = value
            with self.assertRaises(ConfigError) as cm:
                check_eval(c.TEST.LVIS)
            self.assertIn(words, str(cm.exception))
            self.assertIn(f"TEST.LVIS.{key}", str(cm.exception))
        # Several problems: the first is reported, by itself.
        c = cfg.clone()
        c.TEST.LVIS.ENGINE = "fast"
        c.TEST.LVIS.FIXED_K = 0
        with self.assertRaises(ConfigError) as cm:
            check_eval(c.TEST.LVIS)
        self.assertIn("TEST.LVIS.ENGINE 'fast' is unknown; use one of", str(cm.exception))
        self.assertNotIn("FIXED_K", str(cm.exception))


class TestPerCategoryCsv(unittest.TestCase):
    def test_rows(self):
        gt, dets = make_case(9, num_images=5, big_image_dets=5)
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

        gt, dets = make_case(9, num_images=5, big_image_dets=5)
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
