# Copyright (c) fasa_seesaw contributors.
"""
The LVIS evaluation layer: the fast engine (hotcoco) against the official lvis-api, AP-Fixed and
AP-Pool against hand-worked answers from their definitions, TIDE's baseline, the per-category CSV,
and the errors bad inputs get.
"""

import copy
import logging
import numpy as np
import os
import unittest

from fasa_seesaw.evaluation import (
    EvaluationInputError,
    TopKPerClass,
    ap_fixed,
    ap_pool,
    cap_per_class,
    evaluate_lvis,
    evaluate_report,
    tide_errors,
)
from fasa_seesaw.evaluation.caps import cap_per_image
from fasa_seesaw.testing import lvis_api_reference, random_lvis_case

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W, H = 160, 120  # the image size of random_lvis_case


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
            gt, dets = random_lvis_case(seed, ties=ties)
            self.assertGreater(sum(d["image_id"] == 1 for d in dets), 300)
            for iou_type in ("bbox", "segm"):
                with self.subTest(seed=seed, iou_type=iou_type):
                    ref, ref_cat, _ = lvis_api_reference(gt, dets, iou_type)
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
        gt, dets = random_lvis_case(10, ties=True)
        arr = np.array(
            [[d["image_id"], *d["bbox"], d["score"], d["category_id"]] for d in dets], dtype=float
        )
        ref, ref_cat, _ = lvis_api_reference(gt, dets, "bbox")
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
        gt, dets = random_lvis_case(3)
        with_box = evaluate_lvis(gt, dets, "segm", "hotcoco")
        without = [{k: v for k, v in d.items() if k != "bbox"} for d in dets]
        assert_metrics_equal(self, with_box.metrics, evaluate_lvis(gt, without, "segm").metrics)

    def test_per_image_cap_matches_lvis_api(self):
        from lvis.results import LVISResults

        gt, dets = random_lvis_case(4, ties=True)
        for max_dets in (300, 7, 1):
            ours = cap_per_image(dets, max_dets)
            theirs = LVISResults.limit_dets_per_image(None, copy.deepcopy(dets), max_dets)
            key = [(d["image_id"], d["category_id"], d["score"], tuple(d["bbox"])) for d in ours]
            ref = [(d["image_id"], d["category_id"], d["score"], tuple(d["bbox"])) for d in theirs]
            self.assertEqual(key, ref)

    def test_subset_of_images(self):
        gt, dets = random_lvis_case(5)
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
        gt, dets = random_lvis_case(6, ties=False)
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
        gt, dets = random_lvis_case(7)
        ref, _, _ = lvis_api_reference(gt, dets, "bbox")
        t = tide_errors(gt, dets, "bbox")
        self.assertAlmostEqual(t["TIDE_AP50"], ref["AP50"], places=9)
        for k in ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss"):
            self.assertGreaterEqual(t[f"TIDE_{k}"], 0.0)

    def test_report_equals_the_separate_computations(self):
        """evaluate_report shares work (one top-K cut for AP-Fixed and AP-Pool; TIDE from the
        standard hotcoco evaluation); its numbers equal each metric computed on its own."""
        gt, dets = random_lvis_case(11)
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
