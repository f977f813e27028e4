# Copyright (c) fasa_seesaw contributors.
"""
SMOTE and MoEx in FASA's slot: the ring buffer of real features, the neighbour search, the
interpolation, the moment exchange and the label mixing against hand-worked values; that
"gaussian" is FASA as before; what the virtual rows may and may not touch.
"""

import io
import math
import os
import tempfile
import unittest
import pytest
import torch
import torch.distributed as dist
from torch.nn import functional as F

from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.utils.events import EventStorage

from fasa_seesaw import ConfigError
from fasa_seesaw.modeling import FASA, ClassFeatureStore, FASAFastRCNNOutputLayers
from fasa_seesaw.modeling.feature_augment import (
    interpolate,
    mixed_loss,
    moex_exchange,
    moex_partners,
    sample_moex,
    sample_smote,
    smote_neighbours,
)
from fasa_seesaw.testing import spawn_gloo, toy_fasa_seesaw_predictor
from fasa_seesaw.testing import toy_proposals as proposals

# Class 0 of the hand-worked store: four 2-d features, and a fifth slot that is not valid.
A, B, Cc, Dd = (1.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.2)
# Cosine similarities: a-d 1/sqrt(1.04) = 0.981, a-b 0.707, a-c 0, b-c 0.707,
# b-d 1.2/(sqrt(2) sqrt(1.04)) = 0.832, c-d 0.2/sqrt(1.04) = 0.196. Nearest first:
NEAREST = {0: [3, 1, 2], 1: [3, 0, 2], 2: [1, 3, 0], 3: [0, 1, 2]}  # b: a and c tie (0.707)


def hand_store():
    """Class 0: a, b, c, d in slots 0-3 and (1, 0.01) in the invalid slot 4 (nearest to a if it
    counted); class 1: one feature; class 2: none."""
    f = torch.zeros(3, 5, 2)
    f[0, :5] = torch.tensor([A, B, Cc, Dd, (1.0, 0.01)])
    f[1, 0] = torch.tensor((2.0, 3.0))
    return f, torch.tensor([4, 1, 0])


def on_segment(x, p, q):
    """lam with x = lam p + (1 - lam) q, or None when x is not on the line through p, q."""
    d = p - q
    lam = float(((x - q) @ d) / (d @ d))
    return lam if torch.allclose(q + lam * d, x, atol=1e-5) else None


class TestClassFeatureStore(unittest.TestCase):
    def test_ring_buffer_overwrite_order(self):
        store = ClassFeatureStore(3, 2, 3)
        f = [torch.tensor([float(k), 1.0]) for k in range(6)]
        bg = torch.tensor([9.0, 9.0])
        # class 0: f0 f1 f2, then f3 f4 in the next batch; background rows (label 3) never stored
        store.update(torch.stack([f[0], bg, f[1], f[2]]), torch.tensor([0, 3, 0, 0]))
        store.update(torch.stack([f[3], f[4]]), torch.tensor([0, 0]))
        # k-th feature of a class in slot k mod 3: f3, f4, f2
        torch.testing.assert_close(store.features[0], torch.stack([f[3], f[4], f[2]]))
        # class 1: five features in one batch, interleaved with class 2: the last three stay
        store.update(
            torch.stack([f[0], f[5], f[1], f[2], f[3], f[4]]), torch.tensor([1, 2, 1, 1, 1, 1])
        )
        torch.testing.assert_close(store.features[1], torch.stack([f[3], f[4], f[2]]))
        torch.testing.assert_close(store.features[2, 0], f[5])
        self.assertTrue(torch.equal(store.features[2, 1:], torch.zeros(2, 2)))
        self.assertEqual(store.count.tolist(), [5, 5, 1])
        self.assertEqual(store.size.tolist(), [3, 3, 1])

    def test_paused_and_empty(self):
        store = ClassFeatureStore(2, 2, 4)
        with store.paused():
            store.update(torch.ones(2, 2), torch.tensor([0, 1]))
        store.update(torch.ones(0, 2), torch.zeros(0, dtype=torch.long))
        self.assertEqual(store.count.tolist(), [0, 0])
        self.assertEqual(float(store.features.abs().sum()), 0.0)


class TestSmote(unittest.TestCase):
    def test_neighbours_by_hand(self):
        f, size = hand_store()
        nb, k_eff = smote_neighbours(f, size, k=2)
        self.assertEqual(k_eff.tolist(), [2, 0, 0])
        for i, nearest in NEAREST.items():
            if i != 1:  # b's second and third neighbours tie
                self.assertEqual(nb[0, i, :2].tolist(), nearest[:2], f"slot {i}")
        self.assertEqual(nb[0, 1, 0].item(), 3)
        _, k_eff = smote_neighbours(f, size, k=5)
        self.assertEqual(k_eff.tolist(), [3, 0, 0])  # min(5, 4 - 1)

    def test_interpolation(self):
        x = interpolate(torch.tensor([A]), torch.tensor([B]), torch.tensor([0.25]))
        torch.testing.assert_close(x, torch.tensor([[1.0, 0.75]]), rtol=0, atol=0)
        x = interpolate(torch.tensor([A]), torch.tensor([B]), torch.tensor([1.0]))
        torch.testing.assert_close(x, torch.tensor([A]), rtol=0, atol=0)

    def test_samples_lie_between_a_feature_and_its_nearest(self):
        f, size = hand_store()
        g = torch.Generator().manual_seed(0)
        rows = sample_smote(f, size, torch.ones(3), 400, k=1, generator=g)
        # classes with 0 or 1 stored feature give no sample, even at p = 1
        self.assertEqual(set(rows.labels.tolist()), {0})
        self.assertEqual(rows.features.shape, (400, 2))
        # a-d are each other's nearest, so a sample names its segment, not its anchor
        segments = {(0, 3): [], (1, 3): [], (1, 2): []}  # a-d, b-d, c-b
        pts = f[0]
        for x in rows.features:
            hits = [s for s in segments if on_segment(x, pts[s[0]], pts[s[1]]) is not None]
            hits = [s for s in hits if -1e-6 <= on_segment(x, pts[s[0]], pts[s[1]]) <= 1 + 1e-6]
            self.assertTrue(hits, f"{x} is on no segment from a feature to its nearest")
            segments[hits[0]].append(on_segment(x, pts[hits[0][0]], pts[hits[0][1]]))
        for s, lams in segments.items():
            self.assertGreater(len(lams), 20, f"segment {s}")
        # on b-d only b is an anchor (d's nearest is a): lam of b in (0, 1], never d itself
        self.assertGreater(min(segments[(1, 3)]), 0.0)
        self.assertLess(min(segments[(1, 3)]), 0.05)
        self.assertGreater(max(segments[(1, 3)]), 0.95)
        # invalid slot 4 (1, 0.01) never used
        self.assertFalse(any(torch.allclose(x, f[0, 4]) for x in rows.features))

    def test_fixed_layout_weights(self):
        f, size = hand_store()
        rows = sample_smote(f, size, torch.ones(3), 2, generator=torch.Generator(), compact=False)
        self.assertEqual(rows.labels.tolist(), [0, 0, 1, 1, 2, 2])
        self.assertEqual(rows.weight.tolist(), [1, 1, 0, 0, 0, 0])
        self.assertTrue(bool(torch.isfinite(rows.features).all()))


class TestMoEx(unittest.TestCase):
    def test_exchange_by_hand(self):
        x_a = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
        x_b = torch.tensor([[0.0, 4.0, 4.0, 8.0]])
        eps = 1e-5
        # x_a: mean 3, unbiased variance (4 + 1 + 0 + 9) / 3 = 14 / 3
        # x_b: mean 4, unbiased variance (16 + 0 + 0 + 16) / 3 = 32 / 3
        sd_a, sd_b = math.sqrt(14 / 3 + eps), math.sqrt(32 / 3 + eps)
        want = [(v - 3.0) / sd_a * sd_b + 4.0 for v in (1.0, 2.0, 3.0, 6.0)]
        got = moex_exchange(x_a, x_b, eps)
        torch.testing.assert_close(got, torch.tensor([want]), rtol=1e-6, atol=1e-6)
        # eps is what keeps a constant feature finite: it takes x_b's mean exactly
        got = moex_exchange(torch.full((1, 4), 2.0), x_b, eps)
        torch.testing.assert_close(got, torch.full((1, 4), 4.0), rtol=0, atol=1e-6)
        # a different eps changes the result of a feature with a small spread
        small = torch.tensor([[0.0, 0.001, 0.002, 0.003]])
        self.assertFalse(
            torch.allclose(moex_exchange(small, x_b, 1e-5), moex_exchange(small, x_b, 1e-2))
        )

    def test_partners_are_every_stored_feature_of_the_other_classes(self):
        size = torch.tensor([2, 0, 3, 1])
        cases = {
            0: [(2, 0), (2, 1), (2, 2), (3, 0)],
            2: [(0, 0), (0, 1), (3, 0)],
            3: [(0, 0), (0, 1), (2, 0), (2, 1), (2, 2)],
        }
        for c, want in cases.items():
            n = len(want)
            u = (torch.arange(n) + 0.5) / n
            cls_b, slot_b, ok = moex_partners(size, torch.full((n,), c), u)
            self.assertEqual(list(zip(cls_b.tolist(), slot_b.tolist())), want, f"class {c}")
            self.assertTrue(bool(ok.all()))
        _, _, ok = moex_partners(torch.tensor([3, 0]), torch.tensor([0]), torch.tensor([0.5]))
        self.assertFalse(bool(ok.any()))  # no other class has a stored feature

    def test_label_mixing(self):
        logits = torch.tensor([[1.0, 0.0, -1.0]])
        log_z = math.log(math.e + 1 + math.exp(-1))
        want = 0.9 * (log_z - 1.0) + 0.1 * (log_z + 1.0)  # 0.9 CE(y=0) + 0.1 CE(y=2)
        got = mixed_loss(
            lambda s, y: F.cross_entropy(s, y, reduction="none"),
            logits,
            torch.tensor([0]),
            torch.tensor([2]),
            torch.tensor([0.9]),
        )
        self.assertAlmostEqual(got.item(), want, places=6)

    def test_rows(self):
        f, size = hand_store()
        g = torch.Generator().manual_seed(0)
        rows = sample_moex(f, size, torch.ones(3), 50, lam=0.9, generator=g)
        self.assertEqual(set(rows.labels.tolist()), {0, 1})  # class 2 has nothing stored
        self.assertTrue(bool((rows.labels_b != rows.labels).all()))
        torch.testing.assert_close(rows.lam, torch.full((100,), 0.9))
        # each row: some stored x_A of its class with the moments of some stored x_B of y_B
        for x, y, yb in zip(rows.features, rows.labels, rows.labels_b):
            cands = [
                moex_exchange(f[y, i : i + 1], f[yb, j : j + 1])[0]
                for i in range(size[y])
                for j in range(size[yb])
            ]
            self.assertTrue(any(torch.allclose(x, c, atol=1e-5) for c in cands))
        # the fixed layout (accelerators): every class, weight 0 where nothing is stored
        fixed = sample_moex(f, size, torch.ones(3), 2, generator=g, compact=False)
        self.assertEqual(fixed.weight.tolist(), [1, 1, 1, 1, 0, 0])
        self.assertTrue(bool(torch.isfinite(fixed.features).all()))
        # MOEX_PROB 0: no exchange, the stored features themselves with lam 1
        rows = sample_moex(f, size, torch.ones(3), 20, prob=0.0, generator=g)
        torch.testing.assert_close(rows.lam, torch.ones(40))
        for x, y in zip(rows.features, rows.labels):
            self.assertTrue(any(torch.equal(x, f[y, i]) for i in range(size[y])))


C, D = 5, 8
COUNTS = [400, 100, 20, 4, 1]


def ce_predictor(**fasa):
    args = dict(warmup_iters=0, instance_counts=lambda: COUNTS, epoch_iters=lambda: 1)
    args.update(fasa)
    torch.manual_seed(0)
    return FASAFastRCNNOutputLayers(
        ShapeSpec(channels=D),
        box2box_transform=Box2BoxTransform(weights=(10, 10, 5, 5)),
        num_classes=C,
        fasa=FASA(C, D, **args),
    )


class TestInFASA(unittest.TestCase):
    def test_gaussian_is_fasa_as_before(self):
        """loss_fasa of the default against FASA's rules written out here: the bank's first
        sighting (batch mean, sample variance), p_c draws from torch.rand(C), then
        mu + sigma * torch.randn(n, k, D) for the n drawn seen classes, CE averaged, x 0.1."""
        k = 2
        pred = ce_predictor(samples_per_class=k)
        self.assertIsNone(pred.fasa.store)
        pred.fasa.initialize_probs()
        pred.fasa.probs.copy_(torch.tensor([0.9, 0.5, 0.7, 0.8, 0.6]))
        gt = [0, 0, 2, 3, 3, C, 4]  # at most two per class: every rounding is order-free
        x = torch.randn(len(gt), D).relu()
        torch.manual_seed(7)
        with EventStorage(0):
            got = pred.losses(pred(x), proposals(gt))["loss_fasa"]
        xd = x.double()
        mean, var = torch.zeros(C, D, dtype=torch.float64), torch.zeros(C, D, dtype=torch.float64)
        for c, rows in ((0, [0, 1]), (3, [3, 4])):
            m = (xd[rows[0]] + xd[rows[1]]) / 2
            mean[c] = m
            var[c] = ((xd[rows[0]] - m) ** 2 + (xd[rows[1]] - m) ** 2) / 1  # n - 1
        mean[2], mean[4] = xd[2], xd[6]  # seen once: variance 0
        mean, var = mean.float(), var.float()
        seen = torch.tensor([True, False, True, True, True])
        torch.manual_seed(7)
        drawn = (torch.rand(C) < pred.fasa.probs) & seen
        idx = drawn.nonzero().squeeze(1)
        noise = torch.randn(len(idx), k, D)
        feats = (mean[idx][:, None, :] + var[idx].sqrt()[:, None, :] * noise).reshape(-1, D)
        per_row = F.cross_entropy(pred.cls_score(feats), idx.repeat_interleave(k), reduction="none")
        want = per_row.sum() / len(per_row) * 0.1
        self.assertGreater(len(idx), 1)
        self.assertTrue(torch.equal(got, want), f"{got.item()!r} != {want.item()!r}")

    def test_moex_loss_mixes_the_two_labels(self):
        """Two classes stored, both drawn: the class-0 row's partner is class 1 and the other way
        round; with L(., y) = y the loss is 0.1 * mean(0.9 * 0 + 0.1 * 1, 0.9 * 1 + 0.1 * 0)."""
        fasa = FASA(3, 4, augmentation="moex", feature_memory=2, warmup_iters=0)
        fasa.probs_initialized.fill_(True)
        fasa.probs.fill_(1.0)
        with EventStorage(0):
            loss = fasa.loss(
                torch.rand(3, 4),
                torch.tensor([0, 1, 3]),
                torch.nn.Identity(),
                lambda scores, y: y.float(),
            )
        self.assertAlmostEqual(loss.item(), 0.1 * (0.1 + 0.9) / 2, places=6)

    def test_store_only_when_needed_and_checkpointed(self):
        self.assertIsNone(ce_predictor().fasa.store)
        self.assertFalse(any(".store." in k for k in ce_predictor().state_dict()))
        for aug in ("smote", "moex"):
            with self.subTest(augmentation=aug):
                pred = ce_predictor(augmentation=aug, feature_memory=4)
                with EventStorage(0):
                    pred.losses(pred(torch.randn(6, D)), proposals([0, 0, 1, 2, 0, C]))
                state = pred.state_dict()
                self.assertEqual(tuple(state["fasa.store.features"].shape), (C, 4, D))
                buf = io.BytesIO()
                torch.save(state, buf)
                buf.seek(0)
                fresh = ce_predictor(augmentation=aug, feature_memory=4)
                fresh.load_state_dict(torch.load(buf))
                self.assertEqual(fresh.fasa.store.count.tolist(), [3, 1, 1, 0, 0])
                self.assertTrue(torch.equal(fresh.fasa.store.features, pred.fasa.store.features))

    def test_virtual_rows_change_no_loss_state_and_train_only_the_classifier(self):
        for aug in ("smote", "moex"):
            with self.subTest(augmentation=aug):
                pred = toy_fasa_seesaw_predictor(
                    D, COUNTS, warmup_iters=2, augmentation=aug, feature_memory=4
                )
                pred.fasa.probs_initialized.fill_(True)
                pred.fasa.probs.fill_(1.0)
                gt = [0, 0, 2, 2, 3, C]
                for it in range(4):
                    x = torch.randn(len(gt), D, requires_grad=True)
                    with EventStorage(it):
                        losses = pred.losses(pred(x), proposals(gt))
                self.assertGreater(losses["loss_fasa"].item(), 0)
                self.assertEqual(pred.cls_loss.class_counts.tolist(), [8, 0, 8, 4, 0])
                pred.zero_grad()
                losses["loss_fasa"].backward()
                self.assertGreater(pred.cls_score.weight.grad.abs().sum().item(), 0)
                self.assertIsNone(pred.bbox_pred.weight.grad)
                self.assertIsNone(x.grad)

    def test_validation_pass_leaves_the_store(self):
        pred = ce_predictor(augmentation="smote", feature_memory=4)
        with pred.fasa.collect_val_losses():
            with EventStorage(0):
                pred.losses(pred(torch.randn(3, D)), proposals([0, 1, C]))
        self.assertEqual(pred.fasa.store.count.tolist(), [0] * C)

    def test_bad_settings(self):
        for kwargs, words in (
            ({"augmentation": "mixup"}, "AUGMENTATION 'mixup' is unknown"),
            ({"augmentation": "smote", "feature_memory": 1}, "FEATURE_MEMORY 1 is too small"),
            ({"smote_k": 0}, "SMOTE_K must be >= 1"),
            ({"moex_lambda": 0.0}, r"MOEX_LAMBDA must lie in \(0.0, 1.0\]"),
            ({"moex_lambda": 1.5}, r"MOEX_LAMBDA must lie in \(0.0, 1.0\]"),
        ):
            with self.subTest(**kwargs):
                with self.assertRaisesRegex(ConfigError, words):
                    FASA(C, D, **kwargs)


def _store_worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        store = ClassFeatureStore(3, 2, 4)
        for feats, labels in _store_batches():
            store.update(feats[rank], labels[rank])
        torch.save(store.state_dict(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _store_batches():
    """Per batch, each process's (features, labels): different lengths, background rows."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n in ((5, 3), (2, 6), (4, 4)):
        labels = [torch.randint(0, 4, (k,), generator=g) for k in n]
        out.append(([torch.randn(k, 2, generator=g) for k in n], labels))
    return out


@pytest.mark.slow  # two processes
class TestStoreDistributed(unittest.TestCase):
    def test_two_processes_hold_the_store_of_both_in_rank_order(self):
        with tempfile.TemporaryDirectory() as d:
            out, init = os.path.join(d, "store"), os.path.join(d, "init")
            spawn_gloo(_store_worker, (2, init, out), 2, init)
            states = [torch.load(f"{out}.{r}") for r in range(2)]
        single = ClassFeatureStore(3, 2, 4)
        for feats, labels in _store_batches():
            single.update(torch.cat(feats), torch.cat(labels))
        for s in states:
            for k in ("features", "count"):
                self.assertTrue(torch.equal(s[k], single.state_dict()[k]), k)


if __name__ == "__main__":
    unittest.main()
