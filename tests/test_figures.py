# Copyright (c) fasa_seesaw contributors.
"""
The figures: per-category AP and gradient-ratio plots show the values of their CSV, in order of
training images, at the figure's size; the t-SNE and side-by-side figures of tools/; the
plotting tools' readers of checkpoints (banks, groups, probabilities, both state-dict layouts).
"""

import numpy as np
import os
import tempfile
import unittest
import torch

from detectron2.utils.events import EventStorage

from fasa_seesaw.engine.fasa_hook import FASAAdaptationHook
from fasa_seesaw.evaluation import figures
from fasa_seesaw.evaluation.category_table import read_grad_stats_csv, write_grad_stats_csv
from fasa_seesaw.modeling.fasa_feature_bank import ClassFeatureBank

C, D = 5, 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ap_rows():
    train = [5, 300, 5, 40, 120, 1]
    freq = ["r", "f", "r", "c", "f", "r"]
    ap = [10.0, 80.0, float("nan"), 35.0, 60.0, 0.0]
    return [
        {
            "category_id": i + 1,
            "name": f"class{i}",
            "frequency": freq[i],
            "train_images": train[i],
            "ap": ap[i],
        }
        for i in range(len(train))
    ]


class TestFigures(unittest.TestCase):
    def setUp(self):
        self._dir = tempfile.TemporaryDirectory()
        self.dir = self._dir.name

    def tearDown(self):
        self._dir.cleanup()

    def assertPNG(self, path, size=None):
        """A PNG with content; of ``size`` (width, height) pixels when given."""
        from PIL import Image

        with Image.open(path) as img:
            self.assertEqual(img.format, "PNG")
            pixels = np.asarray(img.convert("L"))
            if size is not None:
                self.assertEqual(img.size, size)
        self.assertGreater(pixels.std(), 1.0)  # not a blank image

    def test_per_category_ap_png_and_bars_match_the_csv(self):
        """Rows read back from a per-category CSV: the PNG has the figure's size and the bars
        are the CSV's APs, in order of training images (NaN: no bar)."""
        import csv

        path = os.path.join(self.dir, "ap.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(
                f, fieldnames=["category_id", "name", "frequency", "train_images", "ap"]
            )
            w.writeheader()
            w.writerows(ap_rows())
        with open(path, newline="") as f:
            rows = [
                dict(r, category_id=int(r["category_id"]), train_images=int(r["train_images"]))
                for r in csv.DictReader(f)
            ]
        fig = figures.per_category_ap_figure(rows)
        # Independent order: most training images first, ties by category id.
        expected = [
            float(r["ap"])
            for r in sorted(rows, key=lambda r: (-r["train_images"], r["category_id"]))
            if r["ap"] != "nan"
        ]
        heights = [p.get_height() for p in fig.axes[0].patches if p.get_width() == 0.8]
        self.assertEqual(heights, expected)
        png = figures.plot_per_category_ap(rows, os.path.join(self.dir, "ap.png"))
        width, height = fig.get_size_inches() * fig.dpi
        self.assertPNG(png, size=(round(width), round(height)))

    def test_grad_ratio_lines_match_the_csv(self):
        """The plotted ratio is the CSV's pos / neg per class, in order of training images."""
        table = {
            "category_id": [1, 2, 3, 4],
            "name": list("abcd"),
            "frequency": ["r", "f", "c", "r"],
            "train_images": [1, 400, 30, 8],
        }
        pos, neg = np.array([0.5, 9.0, 2.0, 1.0]), np.array([5.0, 10.0, 1.0, 0.0])
        path = write_grad_stats_csv(os.path.join(self.dir, "g.csv"), table, pos, neg)
        data = read_grad_stats_csv(path)
        fig = figures.grad_ratio_figure({"run": data["ratio"]}, data["train_images"])
        order = np.argsort(-np.asarray(table["train_images"]), kind="stable")
        expected = np.where(neg > 0, pos / np.where(neg > 0, neg, 1.0), np.nan)[order]
        np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), expected)
        png = figures.plot_grad_ratio(
            {"run": data["ratio"]}, data["train_images"], None, os.path.join(self.dir, "g.png")
        )
        width, height = fig.get_size_inches() * fig.dpi
        self.assertPNG(png, size=(round(width), round(height)))

    def test_frequency_order(self):
        rows = ap_rows()
        order = figures.frequency_order(
            [r["train_images"] for r in rows], [r["category_id"] for r in rows]
        )
        # Most training images first; the ties (5 images) in category-id order.
        self.assertEqual(order.tolist(), [1, 4, 3, 0, 2, 5])
        self.assertEqual(figures.frequency_order([3, 3, 3], [9, 1, 5]).tolist(), [1, 2, 0])

    def test_per_category_ap_with_nan_and_tensorboard_image(self):
        path = os.path.join(self.dir, "sub", "ap.png")
        self.assertEqual(figures.plot_per_category_ap(ap_rows(), path, title="box AP"), path)
        self.assertPNG(path)
        img = figures.figure_to_chw_uint8(figures.per_category_ap_figure(ap_rows()))
        self.assertEqual(img.dtype, np.uint8)
        self.assertEqual(img.shape[0], 3)
        with EventStorage() as storage:
            storage.put_image("per_category_ap", img)
        with self.assertRaises(ValueError):
            figures.plot_per_category_ap([{"name": "a"}], path)

    def test_grad_ratio(self):
        train = np.array([1, 400, 30, 8])
        freq = ["r", "f", "c", "r"]
        ce = np.array([0.001, 0.9, 0.05, np.nan])  # NaN: no negative gradient
        seesaw = np.array([0.8, 1.1, 0.9, 0.0])
        path = figures.plot_grad_ratio(
            {"CE": ce, "Seesaw": seesaw}, train, freq, os.path.join(self.dir, "ratio.png")
        )
        self.assertPNG(path)
        fig = figures.grad_ratio_figure({"CE": ce, "Seesaw": seesaw}, train, freq)
        self.assertEqual(fig.axes[0].get_yscale(), "log")
        fig = figures.grad_ratio_figure({"Seesaw": seesaw}, train, freq)
        self.assertEqual(fig.axes[0].get_yscale(), "linear")

    def test_fasa_tsne_twelve_classes(self):
        extra = self.load_tool("figures_extra")  # tools/figures_extra.py (conftest.py)
        rng = np.random.default_rng(0)
        groups = np.arange(12) % 3
        means = rng.normal(size=(12, 16)) + 4.0 * groups[:, None]
        seen = np.ones(12, dtype=bool)
        seen[5] = False
        freq = ["f"] * 4 + ["c"] * 4 + ["r"] * 4
        path = os.path.join(self.dir, "tsne.png")
        self.assertPNG(extra.plot_fasa_tsne(means, seen, groups, path, frequency=freq, seed=0))
        # Degenerate cases: too few or identical points are laid out without t-SNE.
        self.assertEqual(extra.tsne_embedding(means[:2]).shape, (2, 2))
        self.assertEqual(extra.tsne_embedding(np.zeros((4, 3))).shape, (4, 2))
        self.assertPNG(
            extra.plot_fasa_tsne(means[:3], np.array([True, False, False]), groups[:3], path)
        )

    def test_side_by_side(self):
        extra = self.load_tool("figures_extra")  # tools/figures_extra.py (conftest.py)
        rng = np.random.default_rng(0)
        image = rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
        masks = torch.zeros(2, 48, 64, dtype=torch.bool)
        masks[0, 5:20, 5:30] = True
        a = {
            "boxes": torch.tensor([[5.0, 5.0, 30.0, 20.0], [30.0, 25.0, 60.0, 45.0]]),
            "scores": torch.tensor([0.9, 0.2]),
            "classes": torch.tensor([0, 3]),
            "masks": masks,
        }
        b = {
            "boxes": np.array([[30.0, 25.0, 60.0, 45.0]]),
            "scores": np.array([0.7]),
            "classes": np.array([3]),
        }
        path = os.path.join(self.dir, "sbs.png")
        names = ["CE", "Seesaw"]
        self.assertPNG(extra.plot_side_by_side(image, a, b, names, path, list("abcd")))


class TestPlotGradRatioTool(unittest.TestCase):
    def test_compares_two_csv_files(self):
        tool = self.load_tool("plot_grad_ratio")  # tools/plot_grad_ratio.py (conftest.py)
        table = {
            "category_id": [1, 2, 3],
            "name": ["a", "b", "c"],
            "frequency": ["f", "c", "r"],
            "train_images": [200, 50, 2],
        }
        with tempfile.TemporaryDirectory() as d:
            paths = []
            for run, pos in (("ce", [5.0, 0.5, 0.01]), ("seesaw", [5.0, 4.0, 3.0])):
                os.makedirs(os.path.join(d, run))
                paths.append(os.path.join(d, run, "grad_stats.csv"))
                write_grad_stats_csv(paths[-1], table, np.array(pos), np.array([5.0, 5.0, 0.0]))
            out = os.path.join(d, "cmp.png")
            self.assertEqual(tool.main(paths + ["--names", "CE", "Seesaw", "--out", out]), out)
            self.assertGreater(os.path.getsize(out), 1000)
            self.assertTrue(np.isnan(read_grad_stats_csv(paths[0])["ratio"][2]))
            with self.assertRaises(SystemExit):
                tool.main(paths[:1])


def fake_fasa_checkpoint(path, num_stages, groups=None, passes=0, iteration=99, old_keys=False):
    """
    A DetectionCheckpointer-format dict as training writes it: real ClassFeatureBank buffers and
    draw probabilities under each predictor's prefix (a cascade has one per stage; ``old_keys``:
    the predictor's own ``fasa_bank.*`` / ``fasa_probs`` of checkpoints from before FASA became
    a module, else the module's ``fasa.bank.*`` / ``fasa.probs``) and the trainer state, whose
    hooks hold FASAAdaptationHook.state_dict() under its qualname (TrainerBase.state_dict).
    Returns the banks' (mean, count, probs) per stage.
    """
    bank_key, probs_key = ("fasa_bank.", "fasa_probs") if old_keys else ("fasa.bank.", "fasa.probs")
    model, banks = {"backbone.weight": torch.zeros(2)}, []
    for k in range(num_stages):
        prefix = "roi_heads.box_predictor." + (f"{k}." if num_stages > 1 else "")
        bank = ClassFeatureBank(C, D)
        g = torch.Generator().manual_seed(k)
        labels = torch.tensor([0, 0, 1, 2, 3, C, C])  # class 4 unseen; C is background
        bank.update(torch.randn(len(labels), D, generator=g) + k, labels)
        probs = torch.rand(C, generator=g)
        model[prefix + "cls_score.weight"] = torch.zeros(C + 1, D)
        model.update({prefix + bank_key + n: t for n, t in bank.state_dict().items()})
        model[prefix + probs_key] = probs
        banks.append((bank.mean.numpy().copy(), bank.count.numpy().copy(), probs.numpy().copy()))
    hook = FASAAdaptationHook(None, "unused", 0)
    hook.passes, hook.groups = passes, groups
    trainer = {"iteration": iteration, "hooks": {type(hook).__qualname__: hook.state_dict()}}
    torch.save({"model": model, "trainer": trainer, "iteration": iteration}, path)
    return banks


class TestPlotFiguresTool(unittest.TestCase):
    @property
    def tool(self):
        return self.load_tool("plot_figures")  # tools/plot_figures.py (conftest.py)

    def setUp(self):
        self._dir = tempfile.TemporaryDirectory()
        self.dir = self._dir.name

    def tearDown(self):
        self._dir.cleanup()

    def test_reads_bank_and_groups_of_a_cascade_stage(self):
        for old_keys in (False, True):
            with self.subTest(old_keys=old_keys):
                path = os.path.join(self.dir, f"model_final_{int(old_keys)}.pth")
                groups = [np.arange(C) % 2, np.zeros(C, dtype=np.int64), np.array([0, 1, 1, 2, 3])]
                banks = fake_fasa_checkpoint(
                    path, 3, groups=groups, passes=4, iteration=399, old_keys=old_keys
                )
                for stage, k in ((-1, 2), (0, 0), (1, 1)):
                    out = self.tool.load_fasa_bank(path, stage)
                    self.assertEqual((out["stage"], out["num_stages"]), (k, 3))
                    self.assertEqual(out["prefix"], f"roi_heads.box_predictor.{k}.")
                    np.testing.assert_array_equal(out["mean"], banks[k][0])
                    np.testing.assert_array_equal(out["count"], banks[k][1])
                    np.testing.assert_array_equal(out["probs"], banks[k][2])
                    np.testing.assert_array_equal(out["groups"], groups[k])
                    self.assertEqual(out["mean"].shape, (C, D))
                self.assertEqual(out["seen"].tolist(), [True, True, True, True, False])
                self.assertEqual((out["passes"], out["iteration"]), (4, 399))
                with self.assertRaisesRegex(self.tool.ToolError, "stages 0..2"):
                    self.tool.load_fasa_bank(path, 3)

    def test_no_adaptation_pass_yet(self):
        path = os.path.join(self.dir, "model_0000019.pth")
        banks = fake_fasa_checkpoint(path, 1, groups=None, iteration=19)
        out = self.tool.load_fasa_bank(path)
        self.assertIsNone(out["groups"])
        self.assertEqual((out["passes"], out["iteration"], out["stage"]), (0, 19, 0))
        self.assertEqual(out["prefix"], "roi_heads.box_predictor.")
        np.testing.assert_array_equal(out["mean"], banks[0][0])
        freq = self.tool.frequency_groups(["f", "r", "c", "r", "?"])
        self.assertEqual(freq.tolist(), [0, 2, 1, 2, 3])

    def test_clear_errors(self):
        path = os.path.join(self.dir, "ce.pth")
        torch.save({"model": {"roi_heads.box_predictor.cls_score.weight": torch.zeros(2)}}, path)
        with self.assertRaisesRegex(self.tool.ToolError, "MODEL.FASA.ENABLED True"):
            self.tool.load_fasa_bank(path)
        cfg = os.path.join(REPO, "configs", "quickstart", "mask_rcnn_R_18_FPN_fasa_quickstart.yaml")
        missing = os.path.join(self.dir, "nothing.pth")
        for weights, message in ((path, "no FASA feature bank"), (missing, "does not exist")):
            with self.assertRaises(SystemExit) as e:
                self.tool.main(["tsne", "--config-file", cfg, "--weights", weights])
            self.assertTrue(str(e.exception.code).startswith("error: "))
            self.assertIn(message, str(e.exception.code))
            self.assertNotIn("\n", str(e.exception.code))

    def test_rare_image_choice_is_deterministic(self):
        freq = ["f", "r", "c", "r"]

        def image(image_id, cats):
            return {"image_id": image_id, "annotations": [{"category_id": c} for c in cats]}

        dicts = [
            image(7, [0, 1, 1]),  # 2 rare instances, 1 rare class
            image(3, [0, 0, 2]),  # none
            image(12, [1, 3]),  # 2 rare instances, 2 rare classes
            image(5, [3, 3, 3, 0]),  # 3
            image(2, [1, 1]),  # as image 7
        ]
        ids = [d["image_id"] for d in self.tool.choose_rare_images(dicts, freq, 10)]
        self.assertEqual(ids, [5, 12, 2, 7])  # image 3 has no rare instance
        for order in (dicts[::-1], dicts[2:] + dicts[:2]):
            chosen = self.tool.choose_rare_images(order, freq, 3)
            self.assertEqual([d["image_id"] for d in chosen], [5, 12, 2])
        self.assertEqual(self.tool.rare_instance_counts(dicts, freq), [2, 0, 2, 3, 2])
        self.assertEqual(self.tool.choose_rare_images(dicts, ["f"] * 4, 4), [])
        chosen = self.tool.select_images(dicts, ["3", "7"])
        self.assertEqual([d["image_id"] for d in chosen], [3, 7])
        with self.assertRaisesRegex(self.tool.ToolError, "99"):
            self.tool.select_images(dicts, ["99"])

    def test_unique_path_never_overwrites(self):
        path = os.path.join(self.dir, "side_by_side_7.png")
        self.assertEqual(self.tool.unique_path(path), path)
        for k in ("", ".1"):
            open(os.path.join(self.dir, f"side_by_side_7{k}.png"), "w").close()
        self.assertEqual(
            self.tool.unique_path(path), os.path.join(self.dir, "side_by_side_7.2.png")
        )


if __name__ == "__main__":
    unittest.main()
