# Copyright (c) fasa_seesaw contributors.
"""
Gradient statistics (Seesaw supplement Figure A1) against a reference written from the
definition, and the figures: each writes a PNG for a small case.
"""

import copy
import importlib.util
import io
import numpy as np
import os
import tempfile
import types
import unittest
from unittest import mock
import torch
from torch import nn

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from fasa_seesaw import ConfigError
from fasa_seesaw.engine import grad_stats
from fasa_seesaw.engine.fasa_hook import FASAAdaptationHook
from fasa_seesaw.engine.grad_stats import (
    GradientStatsHook,
    category_table,
    read_grad_stats_csv,
    write_grad_stats_csv,
)
from fasa_seesaw.evaluation import figures
from fasa_seesaw.modeling import (
    FASA,
    FASAFastRCNNOutputLayers,
    LongTailFastRCNNOutputLayers,
    SeesawFastRCNNOutputLayers,
    SeesawLoss,
)
from fasa_seesaw.modeling.fasa_feature_bank import ClassFeatureBank

C, D = 5, 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_predictor(kind="ce", seed=0):
    """The project's predictor with detectron2's softmax CE ("ce"), Seesaw with the cosine
    classifier ("seesaw"), or softmax CE with FASA ("fasa")."""
    torch.manual_seed(seed)
    cls, kwargs = {
        "ce": (LongTailFastRCNNOutputLayers, {}),
        "seesaw": (
            SeesawFastRCNNOutputLayers,
            {"cls_loss": SeesawLoss(C), "normed_classifier": True},
        ),
        "fasa": (
            FASAFastRCNNOutputLayers,
            {"fasa": FASA(C, D, warmup_iters=0, instance_counts=lambda: [10, 5, 3, 2, 1])},
        ),
    }[kind]
    return cls(
        ShapeSpec(channels=D),
        box2box_transform=Box2BoxTransform((10, 10, 5, 5)),
        num_classes=C,
        **kwargs,
    )


class TinyRCNN(nn.Module):
    """The part of GeneralizedRCNN the hook sees: roi_heads.box_predictor (one, or per stage)."""

    def __init__(self, predictor):
        super().__init__()
        self.roi_heads = nn.Module()
        self.roi_heads.box_predictor = predictor


def make_batch(gt_per_image, seed):
    """Features and labelled proposals; labels in [0, C], C being background."""
    g = torch.Generator().manual_seed(seed)
    proposals = []
    for gt in gt_per_image:
        n = len(gt)
        xy = torch.rand(n, 2, generator=g) * 50
        inst = Instances((100, 100))
        inst.proposal_boxes = Boxes(torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g)], 1))
        inst.gt_boxes = Boxes(inst.proposal_boxes.tensor + 1.0)
        inst.gt_classes = torch.tensor(gt, dtype=torch.long)
        proposals.append(inst)
    x = torch.randn(sum(len(gt) for gt in gt_per_image), D, generator=g)
    return x, proposals


BATCHES = [
    make_batch([[0, 0, 1, 5, 5, 3], [2, 5, 0, 5]], seed=1),  # class 4 has no RoI
    make_batch([[4, 5, 5], [1, 1, 0, 5, 3]], seed=2),
]


def forward_loss(predictor, batch):
    x, proposals = batch
    scores, deltas = predictor(x)
    losses = predictor.losses((scores, deltas), proposals)
    return scores, sum(losses.values())


def reference_pos_neg(grad, labels):
    """From the definition: |dL/dz_rc| counts as positive for c == y_r, else negative."""
    pos, neg = [0.0] * C, [0.0] * C
    for r in range(grad.shape[0]):
        for c in range(C):
            v = abs(float(grad[r, c]))
            if int(labels[r]) == c:
                pos[c] += v
            else:
                neg[c] += v
    return np.array([pos, neg])


def reference_step(predictor, batch):
    """(2, C) reference stats and the parameter gradients, computed without any hook."""
    scores, loss = forward_loss(predictor, batch)
    params = list(predictor.parameters())
    g_scores, *g_params = torch.autograd.grad(loss, [scores] + params)
    labels = torch.cat([p.gt_classes for p in batch[1]])
    return reference_pos_neg(g_scores, labels), g_params


def hooked_step(predictor, batch, loss_scale=1.0):
    predictor.zero_grad(set_to_none=True)
    _, loss = forward_loss(predictor, batch)
    (loss * loss_scale).backward()
    return [p.grad.clone() for p in predictor.parameters()]


class TestGradientStatsHook(unittest.TestCase):
    def check_against_reference(self, kind):
        pred = make_predictor(kind)
        ref_pred = copy.deepcopy(pred)  # same weights and (Seesaw) class counts
        hook = GradientStatsHook()
        # A DDP-like wrapper: the hook looks through .module.
        hook.attach(types.SimpleNamespace(module=TinyRCNN(pred)))
        expected, steps = np.zeros((2, C)), []
        with EventStorage():
            for batch in BATCHES:
                ref, ref_grads = reference_step(ref_pred, batch)
                grads = hooked_step(pred, batch)
                expected += ref
                steps.append(ref)
                # The hook changes no gradient.
                for a, b in zip(grads, ref_grads):
                    self.assertTrue(torch.equal(a, b))
                np.testing.assert_allclose(hook.totals()[:, 0], expected, rtol=1e-10, atol=1e-12)
        self.assertEqual(hook.totals().dtype, np.float64)
        return steps

    def test_ce_predictor_matches_reference_over_two_steps(self):
        steps = self.check_against_reference("ce")
        self.assertEqual(steps[0][0, 4], 0.0)  # no RoI of class 4 in step 1 ...
        self.assertGreater(steps[0][1, 4], 0.0)  # ... but negatives from every RoI
        self.assertGreater(steps[1][0, 4], 0.0)

    def test_seesaw_predictor_matches_reference(self):
        self.check_against_reference("seesaw")
        # Seesaw's class logits get no gradient from background RoIs (objectness handles
        # them): negatives come from other classes' RoIs only.
        pred = make_predictor("seesaw")
        with EventStorage():
            scores, loss = forward_loss(pred, BATCHES[0])
        (g,) = torch.autograd.grad(loss, scores)
        labels = torch.cat([p.gt_classes for p in BATCHES[0][1]])
        self.assertEqual(float(g[labels == C, :C].abs().sum()), 0.0)
        self.assertGreater(float(g[labels == C, C:].abs().sum()), 0.0)

    def test_cascade_stages_and_loss_scale(self):
        preds = nn.ModuleList([make_predictor("ce", seed=0), make_predictor("seesaw", seed=1)])
        refs = copy.deepcopy(preds)
        hook = GradientStatsHook()
        hook.attach(TinyRCNN(preds))
        # AMP: gradients arrive multiplied by the GradScaler's scale, which the hook divides out.
        hook._scaler = types.SimpleNamespace(_scale=torch.tensor([8.0]))
        with EventStorage():
            for k in range(2):
                ref, _ = reference_step(refs[k], BATCHES[0])
                hooked_step(preds[k], BATCHES[0], loss_scale=8.0)
                np.testing.assert_allclose(hook.totals()[:, k], ref, rtol=1e-6)
            # An overflowed step (which the scaler skips) adds nothing.
            before = hook.totals()
            hooked_step(preds[0], BATCHES[1], loss_scale=float("inf"))
            np.testing.assert_array_equal(hook.totals(), before)

    def test_no_grad_and_fasa_validation_pass_collect_nothing(self):
        pred = make_predictor("fasa")
        hook = GradientStatsHook()
        hook.attach(TinyRCNN(pred))
        with EventStorage():
            with torch.no_grad():
                forward_loss(pred, BATCHES[0])
            with pred.fasa.collect_val_losses() as (sums, counts):
                x, proposals = BATCHES[0]
                scores, deltas = pred(x)
                self.assertEqual(pred.losses((scores, deltas), proposals), {})
                scores.sum().backward()  # a gradient on the scores, but not from training
            self.assertGreater(counts.sum().item(), 0)  # the pass did collect
            self.assertEqual(np.abs(hook.totals()).sum(), 0.0)
            hooked_step(pred, BATCHES[0])
        self.assertGreater(hook.totals().sum(), 0.0)

    def test_needs_the_projects_predictor(self):
        # detectron2's own predictor has no scores hook: a clear error, not silence.
        torch.manual_seed(0)
        plain = FastRCNNOutputLayers(
            ShapeSpec(channels=D), box2box_transform=Box2BoxTransform((10, 10, 5, 5)), num_classes=C
        )
        with self.assertRaisesRegex(ConfigError, "LongTailROIHeads"):
            GradientStatsHook().attach(TinyRCNN(plain))

    def test_state_dict_round_trip_and_resume(self):
        pred = make_predictor("ce")
        ref_pred = copy.deepcopy(pred)
        hook = GradientStatsHook()
        hook.attach(TinyRCNN(pred))
        with EventStorage():
            hooked_step(pred, BATCHES[0])
            ref0, _ = reference_step(ref_pred, BATCHES[0])
            buf = io.BytesIO()
            torch.save(hook.state_dict(), buf)
            buf.seek(0)
            state = torch.load(buf, weights_only=True)
            self.assertEqual(set(state), {"stats"})
            self.assertEqual(state["stats"].dtype, torch.float64)

            # detectron2 loads trainer state before before_train attaches the hook.
            resumed = GradientStatsHook()
            resumed.load_state_dict(state)
            self.assertTrue(torch.equal(resumed.state_dict()["stats"], state["stats"]))
            pred2 = copy.deepcopy(ref_pred)
            resumed.attach(TinyRCNN(pred2))
            np.testing.assert_allclose(resumed.totals()[:, 0], ref0, rtol=1e-10)
            hooked_step(pred2, BATCHES[1])
            ref1, _ = reference_step(ref_pred, BATCHES[1])
        np.testing.assert_allclose(resumed.totals()[:, 0], ref0 + ref1, rtol=1e-10)

    def test_after_train_writes_csv_and_png_and_unwraps(self):
        pred = make_predictor("ce")
        table = {
            "category_id": [1, 2, 3, 4, 5],
            "name": ["a", "b", "c", "d", "e"],
            "frequency": ["f", "f", "c", "r", "r"],
            "train_images": [300, 120, 40, 5, 1],
        }
        with tempfile.TemporaryDirectory() as d:
            hook = GradientStatsHook(d, category_info=lambda: table, label="CE")
            hook.trainer = types.SimpleNamespace(model=TinyRCNN(pred), iter=1, max_iter=1)
            hook.before_train()
            # A scores hook is registered; the predictor's own losses stay in place.
            self.assertEqual(len(pred._scores_hooks), 1)
            self.assertNotIn("losses", pred.__dict__)
            with EventStorage():
                hooked_step(pred, BATCHES[0])
            stats = hook.totals()
            self.assertGreater(stats.sum(), 0.0)
            hook.after_train()
            # ... and removed at the end: further steps add nothing.
            self.assertEqual(len(pred._scores_hooks), 0)
            self.assertEqual(hook._handles, [])
            with EventStorage():
                hooked_step(pred, BATCHES[1])
            np.testing.assert_array_equal(hook.totals(), stats)
            out = read_grad_stats_csv(os.path.join(d, "grad_stats.csv"))
            self.assertGreater(os.path.getsize(os.path.join(d, "grad_ratio.png")), 1000)
        self.assertEqual(out["category_id"].tolist(), table["category_id"])
        self.assertEqual(out["frequency"].tolist(), table["frequency"])
        np.testing.assert_allclose(out["pos"], stats[0, 0], rtol=1e-15)
        np.testing.assert_allclose(out["neg"], stats[1, 0], rtol=1e-15)
        np.testing.assert_allclose(out["ratio"], stats[0, 0] / stats[1, 0], rtol=1e-15)

    def test_category_table_from_metadata_and_from_data(self):
        name = "test_figures_grad_stats_meta"
        MetadataCatalog.get(name).set(
            thing_classes=["x", "y", "z"],
            class_image_count=[
                {"id": 7, "image_count": 3},
                {"id": 2, "image_count": 150},
                {"id": 5, "image_count": 50},
            ],
        )
        t = category_table(name, 3)
        self.assertEqual(t["category_id"], [2, 5, 7])
        self.assertEqual(t["train_images"], [150, 50, 3])
        self.assertEqual(t["frequency"], ["f", "c", "r"])  # LVIS thresholds on the counts

        name = "test_figures_grad_stats_data"
        dicts = [
            {"annotations": [{"category_id": 0}, {"category_id": 0}, {"category_id": 1}]},
            {"annotations": [{"category_id": 0}]},
        ]
        DatasetCatalog.register(name, lambda: dicts)
        MetadataCatalog.get(name).set(thing_classes=["u", "v"], thing_frequency=["c", "r"])
        t = category_table(name, 2)
        self.assertEqual(t["train_images"], [2, 1])  # images, not instances
        self.assertEqual(t["frequency"], ["c", "r"])
        self.assertEqual(t["name"], ["u", "v"])


class TestGradientStatsSync(unittest.TestCase):
    """
    Two processes, simulated in one: all_reduce adds the peer's local sums. (A gloo test with two
    spawned processes takes ~15 s on 2 cores, most of it imports.)
    """

    def test_totals_are_summed_at_checkpoint_iterations_only(self):
        hooks, refs = [], []
        with EventStorage():
            for rank in range(2):
                pred = make_predictor("ce")
                ref_pred = copy.deepcopy(pred)
                hook = GradientStatsHook(sync_period=5)
                hook.attach(TinyRCNN(pred))
                hooked_step(pred, BATCHES[rank])
                refs.append(reference_step(ref_pred, BATCHES[rank])[0])
                hooks.append(hook)
        peer_local = hooks[1]._local.clone()
        calls = []

        def all_reduce(t):
            calls.append(t.shape)
            t += peer_local

        hook = hooks[0]
        with mock.patch.object(
            grad_stats.comm, "get_world_size", return_value=2
        ), mock.patch.object(grad_stats.dist, "all_reduce", side_effect=all_reduce):
            hook.trainer = types.SimpleNamespace(iter=2, max_iter=100)
            hook.after_step()  # iteration 3: no checkpoint, no collective
            self.assertEqual(calls, [])
            # A checkpoint holds the totals of the last sync only (here: none yet) ...
            self.assertEqual(hook.state_dict()["stats"].abs().sum().item(), 0.0)
            hook.trainer.iter = 4
            hook.after_step()  # iteration 5: the checkpointer saves after this hook
            self.assertEqual(len(calls), 1)
            state = hook.state_dict()["stats"].numpy()
            # ... which, after the sync, are the sums over both processes.
            np.testing.assert_allclose(state[:, 0], refs[0] + refs[1], rtol=1e-12)
            self.assertEqual(hook._local.abs().sum().item(), 0.0)
            # An unfinished run writes nothing and calls no collective (a peer may be gone).
            with tempfile.TemporaryDirectory() as d:
                hook.output_dir = d
                hook.after_train()
                self.assertEqual(os.listdir(d), [])
            self.assertEqual(len(calls), 1)


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

    def assertPNG(self, path):
        with open(path, "rb") as f:
            head = f.read(8)
        self.assertEqual(head, b"\x89PNG\r\n\x1a\n")
        self.assertGreater(os.path.getsize(path), 1000)

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
        rng = np.random.default_rng(0)
        groups = np.arange(12) % 3
        means = rng.normal(size=(12, 16)) + 4.0 * groups[:, None]
        seen = np.ones(12, dtype=bool)
        seen[5] = False
        freq = ["f"] * 4 + ["c"] * 4 + ["r"] * 4
        path = os.path.join(self.dir, "tsne.png")
        self.assertPNG(figures.plot_fasa_tsne(means, seen, groups, path, frequency=freq, seed=0))
        # Degenerate cases: too few or identical points are laid out without t-SNE.
        self.assertEqual(figures.tsne_embedding(means[:2]).shape, (2, 2))
        self.assertEqual(figures.tsne_embedding(np.zeros((4, 3))).shape, (4, 2))
        self.assertPNG(
            figures.plot_fasa_tsne(means[:3], np.array([True, False, False]), groups[:3], path)
        )

    def test_side_by_side(self):
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
        self.assertPNG(figures.plot_side_by_side(image, a, b, names, path, list("abcd")))


class TestPlotGradRatioTool(unittest.TestCase):
    def test_compares_two_csv_files(self):
        spec = importlib.util.spec_from_file_location(
            "plot_grad_ratio", os.path.join(REPO, "tools", "plot_grad_ratio.py")
        )
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
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


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", name + ".py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


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
    @classmethod
    def setUpClass(cls):
        cls.tool = load_tool("plot_figures")

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

    def test_reads_the_state_dict_of_a_model_with_fasa(self):
        # The keys the tool looks for are those a real predictor with FASA writes.
        pred = make_predictor("fasa")
        with EventStorage():
            forward_loss(pred, BATCHES[0])  # fills the bank and initialises the probabilities
        pred.fasa.probs.mul_(0.5)
        path = os.path.join(self.dir, "model.pth")
        torch.save({"model": TinyRCNN(pred).state_dict()}, path)
        out = self.tool.load_fasa_bank(path)
        self.assertEqual(out["prefix"], "roi_heads.box_predictor.")
        np.testing.assert_array_equal(out["mean"], pred.fasa.bank.mean.numpy())
        np.testing.assert_array_equal(out["seen"], pred.fasa.bank.seen.numpy())
        np.testing.assert_array_equal(out["probs"], pred.fasa.probs.numpy())

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
