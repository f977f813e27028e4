# Copyright (c) fasa_seesaw contributors.
"""FASA's feature bank, virtual features and adaptation rule against numpy references."""

import numpy as np
import os
import tempfile
import unittest
import pytest
import torch
import torch.distributed as dist

from fasa_seesaw import ConfigError
from fasa_seesaw.modeling.fasa_feature_bank import ClassFeatureBank
from fasa_seesaw.modeling.fasa_sampling import (
    adapt_probabilities,
    initial_probabilities,
    sample_virtual_features,
)
from fasa_seesaw.testing import spawn_gloo

C, D = 4, 3


def batches(seed=0, n_batches=5, n=12):
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n_batches):
        labels = rng.integers(0, C + 1, size=n)  # C = background
        if b == 0:
            labels[labels == 2] = 0  # class 2 first appears later
        feats = rng.normal(size=(n, D)) * (labels[:, None] + 1) + labels[:, None]
        out.append((feats.astype(np.float32), labels))
    return out


def numpy_ema(batch_list, momentum, ddof=1):
    mean, var = np.zeros((C, D)), np.zeros((C, D))
    seen = np.zeros(C, bool)
    for feats, labels in batch_list:
        for c in range(C):
            x = feats[labels == c].astype(np.float64)
            if len(x) == 0:
                continue
            bm, bv = x.mean(0), (x.var(0, ddof=ddof) if len(x) > ddof else np.zeros(D))
            if not seen[c]:
                mean[c], var[c], seen[c] = bm, bv, True
            else:
                mean[c] = momentum * bm + (1 - momentum) * mean[c]
                var[c] = momentum * bv + (1 - momentum) * var[c]
    return mean, var, seen


def numpy_exact(batch_list, ddof=1):
    feats = np.concatenate([f for f, _ in batch_list]).astype(np.float64)
    labels = np.concatenate([lab for _, lab in batch_list])
    mean, var = np.zeros((C, D)), np.zeros((C, D))
    for c in range(C):
        x = feats[labels == c]
        if len(x):
            mean[c] = x.mean(0)
            var[c] = x.var(0, ddof=ddof) if len(x) > ddof else 0.0
    return mean, var


class TestFeatureBank(unittest.TestCase):
    def _feed(self, bank, batch_list):
        for feats, labels in batch_list:
            bank.update(torch.from_numpy(feats), torch.from_numpy(labels))

    def test_ema_matches_numpy(self):
        data = batches()
        for variance, ddof in (("sample", 1), ("population", 0)):
            with self.subTest(variance=variance):
                bank = ClassFeatureBank(C, D, mode="ema", momentum=0.1, variance=variance)
                self._feed(bank, data)
                mean, var, seen = numpy_ema(data, 0.1, ddof)
                np.testing.assert_allclose(bank.mean.numpy(), mean, rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(bank.var.numpy(), var, rtol=1e-6, atol=1e-6)
                np.testing.assert_array_equal(bank.seen.numpy(), seen)

    def test_population_variance_is_narrower_by_the_n_factor(self):
        # One batch with two features of class 0: sample variance is twice the population one.
        x = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, -2.0]])
        labels = torch.tensor([0, 0])
        sample = ClassFeatureBank(C, D, variance="sample")
        population = ClassFeatureBank(C, D, variance="population")
        sample.update(x, labels)
        population.update(x, labels)
        torch.testing.assert_close(sample.var[0], torch.tensor([2.0, 0.0, 8.0]))
        torch.testing.assert_close(population.var[0], torch.tensor([1.0, 0.0, 4.0]))
        with self.assertRaisesRegex(ConfigError, "BANK_VARIANCE"):
            ClassFeatureBank(C, D, variance="unbiased")

    def test_exact_matches_numpy_and_ignores_batching(self):
        data = batches(seed=1)
        for variance, ddof in (("sample", 1), ("population", 0)):
            with self.subTest(variance=variance):
                self._check_exact(data, variance, ddof)

    def _check_exact(self, data, variance, ddof):
        bank = ClassFeatureBank(C, D, mode="exact", variance=variance)
        self._feed(bank, data)
        mean, var = numpy_exact(data, ddof)
        np.testing.assert_allclose(bank.mean.numpy(), mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(bank.var.numpy(), var, rtol=1e-6, atol=1e-6)
        one = ClassFeatureBank(C, D, mode="exact", variance=variance)
        feats = np.concatenate([f for f, _ in data])
        labels = np.concatenate([lab for _, lab in data])
        one.update(torch.from_numpy(feats), torch.from_numpy(labels))
        np.testing.assert_allclose(one.mean.numpy(), bank.mean.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(one.var.numpy(), bank.var.numpy(), rtol=1e-5, atol=1e-5)

    def test_unseen_and_frozen(self):
        bank = ClassFeatureBank(C, D)
        bank.update(torch.ones(2, D), torch.tensor([1, C]))
        self.assertEqual(bank.seen.tolist(), [False, True, False, False])
        with bank.paused():
            bank.update(torch.zeros(2, D), torch.tensor([1, 3]))
        self.assertEqual(bank.seen.tolist(), [False, True, False, False])
        torch.testing.assert_close(bank.mean[1], torch.ones(D))
        bank.update(torch.zeros(2, D), torch.tensor([1, 3]))  # not paused any more
        self.assertEqual(bank.seen.tolist(), [False, True, False, True])

    def test_state_dict_has_statistics(self):
        bank = ClassFeatureBank(C, D)
        self.assertEqual(set(bank.state_dict()), {"mean", "var", "count"})

    def test_bad_mode(self):
        with self.assertRaisesRegex(ConfigError, "unknown"):
            ClassFeatureBank(C, D, mode="median")


def _bank_worker(rank, world, init_file, mode, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        bank = ClassFeatureBank(C, D, mode=mode)
        own = ClassFeatureBank(C, D, mode=mode, sync=False)
        for feats, labels in batches(seed=3):
            half = slice(rank * 6, rank * 6 + 6)
            bank.update(torch.from_numpy(feats[half]), torch.from_numpy(labels[half]))
            own.update(torch.from_numpy(feats[half]), torch.from_numpy(labels[half]))
        torch.save(bank.state_dict(), f"{out}.{rank}")
        torch.save(own.state_dict(), f"{out}.own.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # several processes
class TestFeatureBankDistributed(unittest.TestCase):
    def test_two_processes_equal_single_process_on_union(self):
        for mode in ("ema", "exact"):
            with tempfile.TemporaryDirectory() as d:
                out, init = os.path.join(d, "bank"), os.path.join(d, "init")
                spawn_gloo(_bank_worker, (2, init, mode, out), 2, init)
                states = [torch.load(f"{out}.{r}") for r in range(2)]
                own = [torch.load(f"{out}.own.{r}") for r in range(2)]
            single = ClassFeatureBank(C, D, mode=mode)
            for feats, labels in batches(seed=3):
                single.update(torch.from_numpy(feats), torch.from_numpy(labels))
            for s in states:
                for k in ("mean", "var", "count"):
                    torch.testing.assert_close(s[k], single.state_dict()[k], rtol=1e-5, atol=1e-5)
            # SYNC False: each process's bank is the bank of its own half only.
            for r in range(2):
                half = ClassFeatureBank(C, D, mode=mode)
                for feats, labels in batches(seed=3):
                    sl = slice(r * 6, r * 6 + 6)
                    half.update(torch.from_numpy(feats[sl]), torch.from_numpy(labels[sl]))
                for k in ("mean", "var", "count"):
                    torch.testing.assert_close(
                        own[r][k], half.state_dict()[k], rtol=1e-6, atol=1e-6
                    )
            self.assertFalse(torch.equal(own[0]["mean"], own[1]["mean"]))


class TestVirtualFeatures(unittest.TestCase):
    def test_frequencies_and_moments(self):
        mean = torch.tensor([[0.0, 1.0], [5.0, -2.0], [3.0, 3.0]])
        var = torch.tensor([[1.0, 4.0], [0.25, 1.0], [1.0, 1.0]])
        seen = torch.tensor([True, True, False])
        probs = torch.tensor([0.3, 0.8, 1.0])
        n_draws, k = 4000, 2
        for compact in (False, True):
            with self.subTest(compact=compact):
                g = torch.Generator().manual_seed(0)
                drawn = torch.zeros(3)
                sums = torch.zeros(3, 2)
                sq = torch.zeros(3, 2)
                rows = torch.zeros(3)
                for _ in range(n_draws):
                    f, lab, w = sample_virtual_features(
                        mean, var, seen, probs, k, generator=g, compact=compact
                    )
                    if compact:
                        # only drawn rows, k per drawn class, in class order, weight 1
                        self.assertEqual(f.shape[0] % k, 0)
                        self.assertTrue(bool((w == 1).all()))
                        self.assertTrue(bool((lab.view(-1, k) == lab.view(-1, k)[:, :1]).all()))
                        self.assertEqual(lab.tolist(), sorted(lab.tolist()))
                        w = w * 1.0
                    else:
                        self.assertEqual(f.shape, (3 * k, 2))
                        self.assertEqual(lab.tolist(), [0, 0, 1, 1, 2, 2])
                    # per-class tallies from (labels, weight): independent of the layout
                    drawn.index_add_(0, lab, w / k)
                    sums.index_add_(0, lab, f * w[:, None])
                    sq.index_add_(0, lab, f**2 * w[:, None])
                    rows.index_add_(0, lab, w)
                freq = drawn / n_draws
                self.assertAlmostEqual(freq[0].item(), 0.3, delta=0.03)
                self.assertAlmostEqual(freq[1].item(), 0.8, delta=0.03)
                self.assertEqual(freq[2].item(), 0.0)  # never seen: never drawn
                m = sums[:2] / rows[:2, None]
                v = sq[:2] / rows[:2, None] - m**2
                torch.testing.assert_close(m, mean[:2], atol=0.08, rtol=0)
                torch.testing.assert_close(v, var[:2], atol=0.15, rtol=0.05)

    def test_compact_is_default_on_cpu(self):
        mean, var = torch.zeros(50, 4), torch.ones(50, 4)
        seen = torch.ones(50, dtype=torch.bool)
        f, lab, w = sample_virtual_features(mean, var, seen, torch.full((50,), 0.1), 2)
        self.assertLess(f.shape[0], 100)  # P(all 50 drawn at p=0.1) is 1e-50
        f, lab, w = sample_virtual_features(mean, var, seen, torch.zeros(50), 2)
        self.assertEqual(tuple(f.shape), (0, 4))

    def test_clamp(self):
        mean, var = torch.zeros(2, 5), torch.ones(2, 5)
        f, _, _ = sample_virtual_features(
            mean, var, torch.ones(2, dtype=torch.bool), torch.ones(2), 3, clamp_min=0.0
        )
        self.assertTrue(bool((f >= 0).all()))


class TestSampling(unittest.TestCase):
    def test_initial_probabilities(self):
        p = initial_probabilities([100, 10, 1, 0])
        inv = np.array([1 / 100, 1 / 10, 1.0, 1.0])
        np.testing.assert_allclose(p, inv / inv.sum())
        np.testing.assert_allclose(initial_probabilities([5, 7], "uniform"), [0.5, 0.5])
        with self.assertRaises(ConfigError):
            initial_probabilities([1, 2], "sqrt")

    def test_adaptation_rule(self):
        probs = np.array([0.5, 0.5, 0.2, 0.95, 0.3])
        groups = np.array([0, 0, 1, 2, 3])
        prev = np.array([1.0, 1.0, 1.0, np.nan])
        cur = np.array([0.8, 1.2, 0.5, 0.4])  # g0 fell, g1 rose, g2 fell, g3 no previous value
        out = adapt_probabilities(probs, groups, cur, prev, up=1.1, down=0.9)
        np.testing.assert_allclose(out, [0.55, 0.55, 0.18, 1.0, 0.3])
        np.testing.assert_allclose(adapt_probabilities(probs, groups, cur, None), probs)
        same = adapt_probabilities(probs, groups, prev, prev)
        np.testing.assert_allclose(same, probs)


if __name__ == "__main__":
    unittest.main()
