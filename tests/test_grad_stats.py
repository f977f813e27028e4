# Copyright (c) fasa_seesaw contributors.
"""
The gradient-statistics hook (Seesaw supplement Figure A1): per-class positive and negative
gradients on the class logits against autograd gradients summed by a loop from the definition
(CE, Seesaw, cascade, AMP scale, FASA's validation pass, resume, multi-process sums).
"""

import copy
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
from fasa_seesaw.engine.grad_stats import GradientStatsHook
from fasa_seesaw.evaluation.category_table import category_table, read_grad_stats_csv
from fasa_seesaw.modeling import (
    FASA,
    FASAFastRCNNOutputLayers,
    LongTailFastRCNNOutputLayers,
    SeesawFastRCNNOutputLayers,
    SeesawLoss,
)

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


class TestPlotFiguresReadsARealPredictor(unittest.TestCase):
    def test_reads_the_state_dict_of_a_model_with_fasa(self):
        # The keys the tool looks for are those a real predictor with FASA writes.
        pred = make_predictor("fasa")
        with EventStorage():
            forward_loss(pred, BATCHES[0])  # fills the bank and initialises the probabilities
        pred.fasa.probs.mul_(0.5)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "model.pth")
            torch.save({"model": TinyRCNN(pred).state_dict()}, path)
            out = self.load_tool("plot_figures").load_fasa_bank(path)
        self.assertEqual(out["prefix"], "roi_heads.box_predictor.")
        np.testing.assert_array_equal(out["mean"], pred.fasa.bank.mean.numpy())
        np.testing.assert_array_equal(out["seen"], pred.fasa.bank.seen.numpy())
        np.testing.assert_array_equal(out["probs"], pred.fasa.probs.numpy())
