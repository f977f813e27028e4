# Copyright (c) fasa_seesaw contributors.
"""
EQL and EQLv2 against references written from the papers' formulas and the official code's rules
(float64, explicit loops over RoIs and classes), not from the implementation; their state, the
FASA path and the shipped configs.
"""

import math
import os
import unittest
import torch

from detectron2.data import DatasetCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.utils.events import EventStorage

from fasa_seesaw import ConfigError
from fasa_seesaw.data.counts import image_frequency_of
from fasa_seesaw.modeling import FASA, EQLLoss, EQLv2Loss, LongTailFastRCNNOutputLayers
from fasa_seesaw.testing import toy_proposals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GAMMA, MU, ALPHA = 12.0, 0.8, 4.0


def _sig(z):
    return 1.0 / (1.0 + torch.exp(-z))


def _bce(z, y):
    """-(y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))), scalar by scalar."""
    p = _sig(z)
    return -(y * torch.log(p) + (1 - y) * torch.log(1 - p))


def reference_eql(z, gt, freq, lam):
    """
    EQL paper eq. 3-5 with the official code's rules: L = -sum_j w_j log(p_hat_j) over the C class
    logits, w_j = 1 - E(r) T_lambda(f_j) (1 - y_j), E(r) = 1 iff the RoI is foreground,
    T_lambda(f) = 1 iff f < lambda; summed over RoIs, divided by their number. Returns (total,
    per-RoI list). Columns of ``z`` past the C = len(freq) classes are not part of the loss.
    """
    R, C = z.shape[0], len(freq)
    rows = []
    for r in range(R):
        g = int(gt[r])
        row = z.new_zeros(())
        for j in range(C):
            y = 1.0 if g == j else 0.0
            e = 1.0 if g < C else 0.0
            t = 1.0 if freq[j] < lam else 0.0
            w = 1.0 - e * t * (1.0 - y)
            row = row + w * _bce(z[r, j], y)
        rows.append(row)
    total = sum(rows, z.new_zeros(())) / max(R, 1)
    return total, rows


def reference_eqlv2_weights(ratio):
    """q_j = 1 / (1 + exp(-gamma (g_j - mu))), r_j = 1 + alpha (1 - q_j) per class."""
    q = [1.0 / (1.0 + math.exp(-GAMMA * (g - MU))) for g in ratio]
    return [1.0 + ALPHA * (1.0 - x) for x in q], q


def reference_eqlv2(z, gt, ratio):
    """
    EQLv2 (official eqlv2.py): C + 1 sigmoid logits, targets one-hot with background on the last
    (objectness) column; a class entry weighted r_j if positive and q_j if negative, the objectness
    column weight 1; summed, divided by the number of RoIs. Returns (total, per-RoI class part).
    """
    R, K = z.shape
    C = K - 1
    r_w, q_w = reference_eqlv2_weights(ratio)
    total = z.new_zeros(())
    class_part = []
    for r in range(R):
        cls = z.new_zeros(())
        for j in range(K):
            y = 1.0 if int(gt[r]) == j else 0.0
            if j < C:
                w = r_w[j] if y else q_w[j]
                cls = cls + w * _bce(z[r, j], y)
            else:
                total = total + _bce(z[r, j], y)
        total = total + cls
        class_part.append(cls)
    return total / max(R, 1), class_part


def reference_eqlv2_stats(z, gt, ratio):
    """One step's (pos, neg) per class: |sigmoid(z) - y| times the entry's weight, summed over
    RoIs, split by the target (the objectness column is not collected)."""
    R, K = z.shape
    C = K - 1
    r_w, q_w = reference_eqlv2_weights(ratio)
    pos, neg = [0.0] * C, [0.0] * C
    for r in range(R):
        for j in range(C):
            p = 1.0 / (1.0 + math.exp(-float(z[r, j])))
            if int(gt[r]) == j:
                pos[j] += abs(p - 1.0) * r_w[j]
            else:
                neg[j] += p * q_w[j]
    return pos, neg


def _case(seed=0, R=12, C=6):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(R, C + 1, generator=g, dtype=torch.float64) * 2
    gt = torch.randint(0, C + 1, (R,), generator=g)
    gt[0], gt[1] = C, 0  # at least one background and one foreground RoI
    return z, gt


class TestEQL(unittest.TestCase):
    C = 6
    FREQ = [0.5, 0.25, 0.1, 0.01, 0.0, 0.8]  # exactly representable; 0.25 sits on LAMBDA
    LAMBDA = 0.25

    def make(self, **kw):
        return EQLLoss(self.C, lambda_=self.LAMBDA, image_frequency=lambda: self.FREQ, **kw)

    def test_value_and_gradient(self):
        z, gt = _case()
        loss_mod = self.make(loss_weight=0.7)
        zm = z.clone().requires_grad_(True)
        with EventStorage():
            out = loss_mod(zm, gt)["loss_cls"]
        out.backward()
        zr = z.clone().requires_grad_(True)
        ref, _ = reference_eql(zr, gt, self.FREQ, self.LAMBDA)
        (ref * 0.7).backward()
        torch.testing.assert_close(out.double(), ref.detach() * 0.7, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(zm.grad, zr.grad, rtol=1e-5, atol=1e-7)
        self.assertTrue(torch.all(zm.grad[:, -1] == 0), "the last column is unused")

    def test_per_roi_and_frequency_at_lambda(self):
        """A class whose frequency equals lambda is not a tail class (f < lambda, strictly)."""
        z, gt = _case(1)
        mod = self.make()
        got = mod.per_roi(z, gt)
        _, rows = reference_eql(z, gt, self.FREQ, self.LAMBDA)
        torch.testing.assert_close(got.double(), torch.stack(rows), rtol=1e-6, atol=1e-6)
        self.assertEqual(mod.tail_classes().tolist(), [False, False, True, True, True, False])
        # With "<=" the class at lambda would drop out of foreground rows' negatives.
        _, rows_le = reference_eql(z, gt, self.FREQ, self.LAMBDA + 1e-9)
        fg_not_1 = [r for r in range(len(gt)) if int(gt[r]) not in (1, self.C)]
        self.assertTrue(any(abs(float(rows[r] - rows_le[r])) > 1e-6 for r in fg_not_1))

    def test_all_background_is_sigmoid_ce(self):
        z, _ = _case(2)
        gt = torch.full((z.shape[0],), self.C)
        with EventStorage():
            got = self.make()(z, gt)["loss_cls"]
        plain = (
            sum(_bce(z[r, j], 0.0) for r in range(z.shape[0]) for j in range(self.C)) / z.shape[0]
        )
        torch.testing.assert_close(got.double(), plain, rtol=1e-6, atol=1e-6)

    def test_empty_batch(self):
        z = torch.zeros(0, self.C + 1, requires_grad=True)
        with EventStorage():
            loss = self.make()(z, torch.zeros(0, dtype=torch.long))["loss_cls"]
        self.assertEqual(loss.item(), 0.0)
        loss.backward()
        self.assertEqual(tuple(z.grad.shape), (0, self.C + 1))

    def test_activation_is_sigmoid_with_zero_background(self):
        z, _ = _case(3)
        probs = self.make().activation(z)
        self.assertEqual(tuple(probs.shape), (z.shape[0], self.C + 1))
        torch.testing.assert_close(probs[:, : self.C].double(), _sig(z[:, : self.C]))
        self.assertTrue(torch.all(probs[:, -1] == 0))

    def test_frequencies_on_first_use_travel_with_the_state(self):
        calls = []

        def freq():
            calls.append(1)
            return self.FREQ

        mod = EQLLoss(self.C, lambda_=self.LAMBDA, image_frequency=freq)
        self.assertFalse(bool(mod.frequency_initialized))
        z, gt = _case(4)
        with EventStorage():
            mod(z, gt)
            mod(z, gt)
        self.assertEqual(len(calls), 1)
        state = mod.state_dict()
        self.assertEqual(state["frequency"].tolist(), torch.tensor(self.FREQ).float().tolist())

        def no_data():
            raise AssertionError("a loaded model must not read the training set")

        loaded = EQLLoss(self.C, lambda_=self.LAMBDA, image_frequency=no_data)
        loaded.load_state_dict(state)
        torch.testing.assert_close(loaded.per_roi(z, gt), mod.per_roi(z, gt))
        with self.assertRaisesRegex(ConfigError, "NUM_CLASSES"):
            EQLLoss(self.C + 1, image_frequency=lambda: self.FREQ).tail_classes()

    def test_image_frequency_of_a_dataset(self):
        """Images with the class over images with any annotation (an empty image is left out)."""
        name = "_test_eql_frequency_toy"
        dicts = [
            {"annotations": [{"category_id": 0}, {"category_id": 0}, {"category_id": 2}]},
            {"annotations": [{"category_id": 2}]},
            {"annotations": []},
            {"annotations": [{"category_id": 1}, {"category_id": 2}]},
        ]
        if name not in DatasetCatalog.list():
            DatasetCatalog.register(name, lambda: dicts)
        got = image_frequency_of((name,), 4)
        self.assertEqual(got.tolist(), [1 / 3, 1 / 3, 3 / 3, 0.0])


class TestEQLv2(unittest.TestCase):
    C = 4

    def test_initial_weights_are_one(self):
        """Before any statistics (g = 100) every weight is 1: sigmoid CE with objectness."""
        z, gt = _case(5, C=self.C)
        with EventStorage():
            got = EQLv2Loss(self.C)(z, gt)["loss_cls"]
        plain = (
            sum(
                _bce(z[r, j], 1.0 if int(gt[r]) == j else 0.0)
                for r in range(z.shape[0])
                for j in range(self.C + 1)
            )
            / z.shape[0]
        )
        torch.testing.assert_close(got.double(), plain, rtol=1e-6, atol=1e-6)

    def test_value_gradient_and_per_roi_with_statistics(self):
        ratio = [100.0, 0.9, 0.5, 0.0]  # a class never seen has g = 0
        z, gt = _case(6, C=self.C)
        mod = EQLv2Loss(self.C, loss_weight=0.5)
        mod.pos_neg.copy_(torch.tensor(ratio))
        zm = z.clone().requires_grad_(True)
        with EventStorage():
            out = mod(zm, gt)["loss_cls"]
        out.backward()
        zr = z.clone().requires_grad_(True)
        ref, class_part = reference_eqlv2(zr, gt, ratio)
        (ref * 0.5).backward()
        torch.testing.assert_close(out.double(), ref.detach() * 0.5, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(zm.grad, zr.grad, rtol=1e-4, atol=1e-7)
        # per_roi: the class columns with the weights of the same (pre-update) statistics.
        fresh = EQLv2Loss(self.C)
        fresh.pos_neg.copy_(torch.tensor(ratio))
        torch.testing.assert_close(
            fresh.per_roi(z, gt).double(), torch.stack(class_part).detach(), rtol=1e-5, atol=1e-6
        )

    def test_statistics_over_two_steps(self):
        """
        Worked by hand with all logits 0 (sigmoid 0.5, so every |grad| is 0.5), C = 3.
        Step 1, labels [0, 0, 1, bg], all weights 1: pos = [1, 0.5, 0], neg = [1, 1.5, 2],
        g = [1, 1/3, 0]. Step 2, labels [2, bg], weights from g: q_j = 1/(1+exp(-12(g_j-0.8))),
        r_2 = 1 + 4(1 - q_2): pos += [0, 0, 0.5 r_2], neg += [q_0, q_1, 0.5 q_2].
        """
        C = 3
        mod = EQLv2Loss(C)
        with EventStorage():
            mod(torch.zeros(4, C + 1), torch.tensor([0, 0, 1, C]))
            torch.testing.assert_close(mod.pos_grad, torch.tensor([1.0, 0.5, 0.0]))
            torch.testing.assert_close(mod.neg_grad, torch.tensor([1.0, 1.5, 2.0]))
            torch.testing.assert_close(mod.pos_neg, torch.tensor([1.0, 1 / 3, 0.0]))
            mod(torch.zeros(2, C + 1), torch.tensor([2, C]))
        q = [1 / (1 + math.exp(-12 * (g - 0.8))) for g in (1.0, 1 / 3, 0.0)]
        r2 = 1 + 4 * (1 - q[2])
        pos = [1.0, 0.5, 0.5 * r2]
        neg = [1.0 + q[0], 1.5 + q[1], 2.0 + 0.5 * q[2]]
        torch.testing.assert_close(mod.pos_grad, torch.tensor(pos))
        torch.testing.assert_close(mod.neg_grad, torch.tensor(neg))
        torch.testing.assert_close(mod.pos_neg, torch.tensor([p / n for p, n in zip(pos, neg)]))

    def test_statistics_match_the_reference_on_random_logits(self):
        ratio = [2.0, 0.8, 0.3, 0.0]
        z, gt = _case(7, C=self.C)
        mod = EQLv2Loss(self.C)
        mod.pos_neg.copy_(torch.tensor(ratio))
        with EventStorage():
            mod(z.float(), gt)
        pos, neg = reference_eqlv2_stats(z, gt, ratio)
        torch.testing.assert_close(mod.pos_grad, torch.tensor(pos).float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mod.neg_grad, torch.tensor(neg).float(), rtol=1e-5, atol=1e-6)

    def test_all_background_and_empty_batches(self):
        C = self.C
        mod = EQLv2Loss(C)
        with EventStorage():
            z = torch.zeros(0, C + 1, requires_grad=True)
            loss = mod(z, torch.zeros(0, dtype=torch.long))["loss_cls"]
            self.assertEqual(loss.item(), 0.0)
            loss.backward()
            # Nothing seen: the statistics and the initial ratio stay as they were.
            self.assertEqual(mod.pos_neg.tolist(), [100.0] * C)
            self.assertEqual(mod.neg_grad.tolist(), [0.0] * C)
            mod(torch.zeros(3, C + 1), torch.full((3,), C))
        self.assertEqual(mod.pos_grad.tolist(), [0.0] * C)
        self.assertEqual(mod.neg_grad.tolist(), [1.5] * C)
        self.assertEqual(mod.pos_neg.tolist(), [0.0] * C)

    def test_activation(self):
        z, _ = _case(8, C=self.C)
        p = _sig(z)
        with_obj = EQLv2Loss(self.C).activation(z)
        torch.testing.assert_close(with_obj[:, :-1].double(), p[:, :-1] * (1 - p[:, -1:]))
        torch.testing.assert_close(with_obj[:, -1].double(), p[:, -1])
        without = EQLv2Loss(self.C, test_with_obj=False).activation(z)
        torch.testing.assert_close(without.double(), p)

    def test_bad_hyper_parameters(self):
        with self.assertRaisesRegex(ConfigError, "MODEL.EQLV2.GAMMA"):
            EQLv2Loss(3, gamma=-1.0)
        with self.assertRaisesRegex(ConfigError, "MODEL.EQLV2.PRIOR_PROB"):
            EQLv2Loss(3, prior_prob=0.0)


class TestInPredictor(unittest.TestCase):
    """per_roi and FASA's virtual rows leave the statistics alone; the prior bias is set."""

    C, D = 4, 8

    def predictor(self, cls_loss, fasa=True):
        torch.manual_seed(0)
        return LongTailFastRCNNOutputLayers(
            ShapeSpec(channels=self.D),
            box2box_transform=Box2BoxTransform(weights=(10, 10, 5, 5)),
            num_classes=self.C,
            cls_loss=cls_loss,
            fasa=(
                FASA(
                    self.C,
                    self.D,
                    warmup_iters=0,
                    samples_per_class=3,
                    instance_counts=lambda: [9, 5, 2, 1],
                )
                if fasa
                else None
            ),
        )

    def test_prior_bias(self):
        for loss in (EQLLoss(self.C, image_frequency=lambda: [0.1] * 4), EQLv2Loss(self.C)):
            pred = self.predictor(loss, fasa=False)
            self.assertEqual(pred.cls_score.out_features, self.C + 1)
            torch.testing.assert_close(
                pred.cls_score.bias, torch.full((self.C + 1,), -math.log(0.999 / 0.001))
            )

    def test_fasa_rows_and_per_roi_do_not_feed_eqlv2(self):
        gt = [0, 1, 1, self.C]
        x = torch.randn(len(gt), self.D)
        with_fasa = self.predictor(EQLv2Loss(self.C))
        with_fasa.fasa.probs_initialized.fill_(True)
        with_fasa.fasa.probs.fill_(1.0)  # every seen class draws virtual rows
        alone = EQLv2Loss(self.C)
        with EventStorage(5):
            for _ in range(2):
                scores, deltas = with_fasa(x)
                losses = with_fasa.losses((scores, deltas), toy_proposals(gt))
                alone(scores.detach(), torch.tensor(gt))
            self.assertGreater(losses["loss_fasa"].item(), 0)
            before = {k: v.clone() for k, v in with_fasa.cls_loss.state_dict().items()}
            with_fasa.per_roi_cls_loss(scores, torch.tensor(gt))
            with with_fasa.fasa.collect_val_losses():  # FASA's validation pass
                with_fasa.losses(with_fasa(x), toy_proposals(gt))
        for k, v in with_fasa.cls_loss.state_dict().items():
            self.assertTrue(torch.equal(v, before[k]), k)
            torch.testing.assert_close(v, alone.state_dict()[k])

    def test_eql_per_roi_keeps_frequencies(self):
        loss = EQLLoss(self.C, lambda_=0.3, image_frequency=lambda: [0.5, 0.2, 0.1, 0.9])
        pred = self.predictor(loss)
        pred.fasa.probs_initialized.fill_(True)
        pred.fasa.probs.fill_(1.0)
        with EventStorage(5):
            losses = pred.losses(pred(torch.randn(3, self.D)), toy_proposals([0, 2, self.C]))
        self.assertGreater(losses["loss_fasa"].item(), 0)
        self.assertEqual(loss.frequency.tolist(), torch.tensor([0.5, 0.2, 0.1, 0.9]).tolist())


class TestShippedConfigs(unittest.TestCase):
    """The LVIS, quickstart and study configs select their loss with the papers' values."""

    def test_configs_select_their_loss(self):
        from detectron2.config import get_cfg

        from fasa_seesaw import add_fasa_seesaw_config
        from fasa_seesaw.config import merge_config
        from fasa_seesaw.engine.settings import check_settings
        from fasa_seesaw.modeling import build_cls_loss, resolve_cls_loss

        lvis = "configs/LVISv1-InstanceSegmentation"
        cases = {
            f"{lvis}/mask_rcnn_R_50_FPN_2x_eql_random_lvis_v1.yaml": ("eql", EQLLoss),
            f"{lvis}/mask_rcnn_R_50_FPN_2x_eqlv2_random_lvis_v1.yaml": ("eqlv2", EQLv2Loss),
            f"{lvis}/cascade_mask_rcnn_R_50_FPN_2x_eqlv2_random_lvis_v1.yaml": (
                "eqlv2",
                EQLv2Loss,
            ),
            "configs/quickstart/mask_rcnn_R_18_FPN_eql_quickstart.yaml": ("eql", EQLLoss),
            "configs/quickstart/mask_rcnn_R_18_FPN_eqlv2_quickstart.yaml": ("eqlv2", EQLv2Loss),
            "configs/study/mask_rcnn_R_18_FPN_eql_study.yaml": ("eql", EQLLoss),
            "configs/study/mask_rcnn_R_18_FPN_eqlv2_study.yaml": ("eqlv2", EQLv2Loss),
        }
        for path, (name, cls) in cases.items():
            with self.subTest(config=path):
                cfg = get_cfg()
                add_fasa_seesaw_config(cfg)
                cfg = merge_config(cfg, os.path.join(ROOT, path))
                check_settings(cfg)
                self.assertEqual(resolve_cls_loss(cfg), name)
                loss = build_cls_loss(cfg, name)
                self.assertIsInstance(loss, cls)
                self.assertAlmostEqual(loss.prior_prob, 0.001)
                if name == "eqlv2":
                    self.assertEqual((loss.gamma, loss.mu, loss.alpha), (GAMMA, MU, ALPHA))
                elif "lvis" in path:
                    self.assertAlmostEqual(loss.lambda_, 0.0011)
                if "lvis" in path:
                    self.assertEqual(cfg.MODEL.ROI_HEADS.NUM_CLASSES, 1203)
                    self.assertEqual(cfg.SOLVER.MAX_ITER, 150000)


if __name__ == "__main__":
    unittest.main()
