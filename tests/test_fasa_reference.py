# Copyright (c) fasa_seesaw contributors.
"""
FASA's default rules against a transcription of the official code (yuhangzang/FASA:
fasa/fasa_bbox_head.py ``fa_update_push`` / ``dynamic_sampling``, fasa/cross_entropy_loss.py
``CrossEntropyCounterLoss`` with ``use_cums``), written here from those rules with per-class loops
and no project code. The project's bank, predictor collection and adaptation hook are driven
with the same inputs and must agree to 1e-6.
"""

import numpy as np
import unittest
import torch
from torch.nn import functional as F

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from fasa_seesaw import add_fasa_seesaw_config
from fasa_seesaw.engine import FASAAdaptationHook
from fasa_seesaw.modeling import FASAFastRCNNOutputLayers
from fasa_seesaw.modeling.fasa_feature_bank import ClassFeatureBank
from fasa_seesaw.modeling.fasa_sampling import adapt_probabilities, group_signal

C, D = 6, 5
TOL = dict(rtol=1e-6, atol=1e-6)


class OfficialFASA:
    """The official rules, class by class, in float64."""

    def __init__(self, probs, decay=0.1, up=1.1, down=0.9):
        self.feature_mean = torch.zeros(C, D, dtype=torch.float64)
        self.feature_std = torch.zeros(C, D, dtype=torch.float64)  # holds the variance
        self.feature_used = torch.zeros(C)
        self.decay, self.up, self.down = decay, up, down
        self.prob_list = torch.tensor(probs, dtype=torch.float64)
        self.t0 = torch.zeros(C + 1, dtype=torch.float64)

    # fa_update: positives of one training batch
    def fa_update(self, embedding, labels):
        for c in torch.unique(labels).tolist():
            self.fa_update_push(embedding[labels == c].double(), c)

    def fa_update_push(self, embedding, c):
        mean = embedding.mean(dim=0)
        var = embedding.var(dim=0, unbiased=False)
        n = embedding.numel() / embedding.size(1)
        if n > 1:
            var = var * n / (n - 1)
        if self.feature_used[c] > 0:
            self.feature_mean[c] = self.decay * mean + (1 - self.decay) * self.feature_mean[c]
            self.feature_std[c] = self.decay * var + (1 - self.decay) * self.feature_std[c]
        else:
            self.feature_mean[c] = mean
            self.feature_std[c] = var
            self.feature_used[c] += 1

    # CrossEntropyCounterLoss.forward with use_cums, over one validation pass
    @staticmethod
    def counter_loss(scores, labels):
        cum_losses = torch.zeros(C + 1, dtype=torch.float64)
        cum_labels = torch.zeros(C + 1, dtype=torch.float64)
        for s, lab in zip(scores, labels):
            loss = F.cross_entropy(s.double(), lab, reduction="none")
            for u in lab.unique().tolist():
                idx = torch.where(lab == u)[0]
                cum_labels[u] += len(idx)
                cum_losses[u] += loss[idx].sum()
        return cum_losses, cum_labels

    def dynamic_sampling(self, cum_losses, cum_labels, group_list):
        t1 = cum_losses / cum_labels.sum()
        if self.t0.sum() == 0:
            self.t0[:] = t1
        for group in group_list:
            delta = t1[group].sum() - self.t0[group].sum()
            if delta > 0:
                self.prob_list[group] = (self.prob_list[group] * self.down).clamp(0, 1)
            if delta < 0:
                self.prob_list[group] = (self.prob_list[group] * self.up).clamp(0, 1)
        self.t0[:] = t1


def group_lists(groups):
    return [np.flatnonzero(groups == g).tolist() for g in np.unique(groups)]


def training_batches():
    """Positives and background, with a class first seen with n = 2 and one seen once."""
    g = torch.Generator().manual_seed(0)
    out = []
    for b in range(6):
        labels = torch.randint(0, C + 1, (24,), generator=g)
        if b == 0:
            labels[labels == 4] = C
            labels[:2] = 4  # class 4 first seen with exactly two features
        if b < 3:
            labels[labels == 5] = C
        if b == 3:
            labels[labels == 5] = C
            labels[0] = 5  # class 5 first seen once: variance 0
        # two well-separated blobs of class means: classes 0-2 and 3-5
        centre = torch.where(labels[:, None] < 3, 1.0, 6.0) + 0.1 * labels[:, None].double()
        feats = centre + 0.5 * torch.randn(len(labels), D, generator=g, dtype=torch.float64)
        out.append((feats.float(), labels))
    return out


def make_predictor(probs):
    """A predictor with the project's default FASA settings (add_fasa_seesaw_config)."""
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = C
    cfg.MODEL.FASA.ENABLED = True
    torch.manual_seed(0)
    pred = FASAFastRCNNOutputLayers(cfg, ShapeSpec(channels=D))
    pred.fasa.probs.copy_(torch.tensor(probs))
    pred.fasa.probs_initialized.fill_(True)
    return pred


def proposals(labels):
    inst = Instances((64, 64))
    boxes = torch.tensor([[4.0, 4.0, 30.0, 30.0]]).repeat(len(labels), 1)
    inst.proposal_boxes = Boxes(boxes)
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = labels
    return [inst]


def validation_passes():
    """
    Five passes of (scores, labels) batches. Groups: A = classes 0-2, B = 3-5.
      1 baseline; 2 the same foreground RoIs with three times the background (foreground share
      falls, group A unchanged); 3 group B's RoIs vanish; 4 B comes back; 5 more foreground.
    """
    g = torch.Generator().manual_seed(1)

    def rois(labels):
        return torch.randn(len(labels), C + 1, generator=g) * 2, torch.tensor(labels)

    fg_a = [0, 0, 1, 2, 2, 2, 1]
    fg_b = [3, 4, 4, 5, 3]
    base = [rois(fg_a + fg_b + [C] * 20)]
    grown = [base[0], rois([C] * 40)]
    no_b = [rois(fg_a + [C] * 12)]
    back = [rois(fg_b + [3, 5] + [C] * 10), rois(fg_a + [C] * 8)]
    more_fg = [rois(fg_a * 3 + fg_b * 2 + [C] * 5)]
    return [base, grown, no_b, back, more_fg]


class TestAgainstOfficialRules(unittest.TestCase):
    def test_bank_mean_and_sample_variance(self):
        ref = OfficialFASA([0.1] * C)
        bank = ClassFeatureBank(C, D)  # defaults: ema, momentum 0.1, sample variance
        for feats, labels in training_batches():
            fg = labels < C
            ref.fa_update(feats[fg], labels[fg])
            bank.update(feats, labels)
        self.assertEqual(bank.seen.tolist(), (ref.feature_used > 0).tolist())
        np.testing.assert_allclose(bank.mean.numpy(), ref.feature_mean.numpy(), **TOL)
        np.testing.assert_allclose(bank.var.numpy(), ref.feature_std.numpy(), **TOL)

    def test_collection_matches_counter_loss(self):
        pred = make_predictor([0.1] * C)
        pred.train()
        for batches in validation_passes():
            with pred.fasa.collect_val_losses() as (sums, counts), EventStorage(0):
                for scores, labels in batches:
                    out = pred.losses((scores, torch.zeros(len(labels), 4 * C)), proposals(labels))
                    self.assertEqual(out, {})
            cum_losses, cum_labels = OfficialFASA.counter_loss(*zip(*batches))
            np.testing.assert_allclose(counts.numpy(), cum_labels.numpy(), **TOL)
            np.testing.assert_allclose(sums[:C].numpy(), cum_losses[:C].numpy(), **TOL)
        self.assertFalse(pred.fasa.collecting)

    def _drive(self, clustering, seed, reference_groups, **cluster_kwargs):
        """Train both on the same batches, then run the five passes through both."""
        probs = [0.3, 0.2, 0.25, 0.1, 0.05, 0.9]
        ref = OfficialFASA(probs)
        pred = make_predictor(probs)
        pred.train()
        with EventStorage(0):
            for feats, labels in training_batches():
                fg = labels < C
                ref.fa_update(feats[fg], labels[fg])
                pred.fasa.bank.update(feats, labels)
        hook = FASAAdaptationHook(
            None, "unused", period=1, clustering=clustering, seed=seed, **cluster_kwargs
        )
        history = []
        for batches in validation_passes():
            with pred.fasa.collect_val_losses() as (sums, counts), EventStorage(0):
                for scores, labels in batches:
                    pred.losses((scores, torch.zeros(len(labels), 4 * C)), proposals(labels))
            hook.apply([pred.fasa], [(sums.numpy(), counts.numpy())])
            groups = hook.groups[0]
            expected = reference_groups(ref)
            if expected is not None:
                self.assertEqual(sorted(group_lists(groups)), sorted(expected))
            ref.dynamic_sampling(*OfficialFASA.counter_loss(*zip(*batches)), group_lists(groups))
            np.testing.assert_allclose(pred.fasa.probs.numpy(), ref.prob_list.numpy(), **TOL)
            history.append(pred.fasa.probs.clone())
        return history

    def test_default_adaptation_over_passes(self):
        # Default clustering (MeanShift) finds the two blobs; the update from the same groups
        # matches the official rule pass after pass.
        # (A fixed bandwidth: with 6 classes a quantile of 15 distances is too coarse a rule.)
        history = self._drive("meanshift", 0, lambda ref: [[0, 1, 2], [3, 4, 5]], bandwidth=3.0)
        a, b = slice(0, 3), slice(3, 6)
        # Pass 1 is the baseline. Pass 2: A's loss sum is unchanged while the background grows,
        # so its normalised value falls and p goes up.
        torch.testing.assert_close(history[0], torch.tensor([0.3, 0.2, 0.25, 0.1, 0.05, 0.9]))
        torch.testing.assert_close(history[1][a], history[0][a] * 1.1)
        # Pass 3: B's RoIs vanish: its value falls to 0, so p goes up (the reference's rule).
        torch.testing.assert_close(history[2][b], (history[1][b] * 1.1).clamp(max=1))
        self.assertEqual(len({tuple(h.tolist()) for h in history}), 5)

    def test_reference_clustering(self):
        # CLUSTERING affinity_reference: AffinityPropagation(random_state=1,
        # affinity="precomputed") fit on the squared distances of all class means.
        from sklearn.cluster import AffinityPropagation

        def official_groups(ref):
            m = ref.feature_mean.float()
            mean_xy = m @ m.T
            x2 = m.square().sum(1)
            distance = (x2[:, None] - 2 * mean_xy + x2[None, :]).numpy()
            labels = AffinityPropagation(random_state=1, affinity="precomputed").fit(distance)
            labels = labels.labels_
            return [[i for i, v in enumerate(labels) if v == k] for k in range(max(labels) + 1)]

        # The hook's seed (ADAPT.SEED, 0 here) is not the official call's random_state.
        self._drive("affinity_reference", 0, official_groups)


class TestGroupSignal(unittest.TestCase):
    @staticmethod
    def adapt(probs, groups, cur, prev, mode):
        return adapt_probabilities(
            probs, groups, group_signal(*cur, groups, mode), group_signal(*prev, groups, mode)
        )

    def test_reference_and_mean_per_roi_disagree_as_documented(self):
        # A group going from 10 RoIs with loss sum 10 to 20 RoIs with loss sum 16, out of the
        # same 100 sampled RoIs: its total loss rose (reference: p down), its mean loss per RoI
        # fell (mean_per_roi: p up).
        groups = np.zeros(1, dtype=int)
        prev = (np.array([10.0, 0.0]), np.array([10.0, 90.0]))
        cur = (np.array([16.0, 0.0]), np.array([20.0, 80.0]))
        for mode, expected in (("reference", 0.45), ("mean_per_roi", 0.55)):
            with self.subTest(mode=mode):
                new = self.adapt([0.5], groups, cur, prev, mode)
                self.assertAlmostEqual(float(new[0]), expected, places=12)

    def test_mean_per_roi_ignores_the_foreground_share(self):
        # Same foreground RoIs and losses, three times the background: the reference value
        # falls (p up), the per-RoI mean stays (p unchanged).
        groups = np.array([0, 0])
        sums = np.array([3.0, 1.0, 0.0])
        prev = (sums, np.array([2.0, 2.0, 10.0]))
        cur = (sums, np.array([2.0, 2.0, 30.0]))
        np.testing.assert_allclose(
            self.adapt([0.5, 0.4], groups, cur, prev, "reference"), [0.55, 0.44]
        )
        np.testing.assert_allclose(
            self.adapt([0.5, 0.4], groups, cur, prev, "mean_per_roi"), [0.5, 0.4]
        )

    def test_vanished_group(self):
        # Without RoIs: value 0 under "reference" (p up when it had loss before), undefined under
        # "mean_per_roi" (p unchanged).
        groups = np.array([0, 1])
        prev = (np.array([2.0, 1.0, 0.0]), np.array([2.0, 1.0, 5.0]))
        cur = (np.array([2.0, 0.0, 0.0]), np.array([2.0, 0.0, 6.0]))
        np.testing.assert_allclose(group_signal(*cur, groups, "reference"), [2.0 / 8.0, 0.0])
        self.assertTrue(np.isnan(group_signal(*cur, groups, "mean_per_roi")[1]))
        # group 0: 2/8 then 2/8, equal: unchanged; group 1: 1/8 then 0: up
        np.testing.assert_allclose(
            self.adapt([0.5, 0.5], groups, cur, prev, "reference"), [0.5, 0.55]
        )
        np.testing.assert_allclose(
            self.adapt([0.5, 0.5], groups, cur, prev, "mean_per_roi"), [0.5, 0.5]
        )
