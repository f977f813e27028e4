# Copyright (c) fasa_seesaw contributors.
"""
Seesaw Loss against a dense reference written from the paper's formulas (float64, explicit loops
over samples and classes), not from the implementation.
"""

import math
import numpy as np
import unittest
import torch

from fasa_seesaw import ConfigError
from fasa_seesaw.modeling.seesaw_loss import (
    check_seesaw_params,
    count_foreground,
    seesaw_cross_entropy,
    seesaw_losses,
    seesaw_probs,
)


def reference_seesaw_ce(z, labels, counts, p, q, eps):
    """
    L = -log sigma_hat_i, sigma_hat_i = e^{z_i} / (sum_{j != i} S_ij e^{z_j} + e^{z_i}),
    S_ij = M_ij C_ij, M_ij = (N_j/N_i)^p if N_j < N_i else 1,
    C_ij = (sigma_j/sigma_i)^q if sigma_j > sigma_i else 1, sigma = softmax(z), sigma_i >= eps.
    """
    z = np.asarray(z, dtype=np.float64)
    n = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    out = []
    for r in range(z.shape[0]):
        i = int(labels[r])
        sigma = np.exp(z[r] - z[r].max())
        sigma /= sigma.sum()
        sigma_i = max(sigma[i], eps)
        denom = math.exp(z[r, i])
        for j in range(z.shape[1]):
            if j == i:
                continue
            m = (n[j] / n[i]) ** p if n[j] < n[i] else 1.0
            c = (sigma[j] / sigma_i) ** q if sigma[j] > sigma_i else 1.0
            denom += m * c * math.exp(z[r, j])
        out.append(-(z[r, i] - math.log(denom)))
    return np.array(out)


def reference_grad(z, labels, counts, p, q, eps, h=1e-6):
    """Central differences of the reference loss sum; S is held fixed (sigma is detached)."""
    z = np.asarray(z, dtype=np.float64)
    n = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    grad = np.zeros_like(z)
    for r in range(z.shape[0]):
        i = int(labels[r])
        sigma = np.exp(z[r] - z[r].max())
        sigma /= sigma.sum()
        s = np.ones(z.shape[1])
        for j in range(z.shape[1]):
            if j != i:
                m = (n[j] / n[i]) ** p if n[j] < n[i] else 1.0
                sj, si = sigma[j], max(sigma[i], eps)
                s[j] = m * ((sj / si) ** q if sj > si else 1.0)

        def loss(zr):
            return -(zr[i] - math.log(np.sum(s * np.exp(zr))))

        for j in range(z.shape[1]):
            zp, zm = z[r].copy(), z[r].copy()
            zp[j] += h
            zm[j] -= h
            grad[r, j] = (loss(zp) - loss(zm)) / (2 * h)
    return grad


class TestSeesawLoss(unittest.TestCase):
    def setUp(self):
        g = torch.Generator().manual_seed(0)
        self.C = 7
        self.z = torch.randn(12, self.C, generator=g, dtype=torch.float64) * 3
        self.labels = torch.randint(0, self.C, (12,), generator=g)
        self.counts = torch.tensor([500, 120, 40, 9, 3, 1, 0])

    def test_value_matches_reference(self):
        for p, q in [(0.8, 2.0), (0.0, 2.0), (0.8, 0.0), (1.5, 0.5), (0.0, 0.0)]:
            ours = seesaw_cross_entropy(self.z, self.labels, self.counts, p, q, 0.01)
            ref = reference_seesaw_ce(self.z.numpy(), self.labels, self.counts.numpy(), p, q, 0.01)
            np.testing.assert_allclose(ours.double().numpy(), ref, rtol=1e-5, atol=1e-5)

    def test_p_q_zero_is_plain_cross_entropy(self):
        ours = seesaw_cross_entropy(self.z, self.labels, self.counts, 0.0, 0.0, 0.01)
        ce = torch.nn.functional.cross_entropy(self.z.float(), self.labels, reduction="none")
        torch.testing.assert_close(ours, ce, rtol=1e-6, atol=1e-6)

    def test_gradient_matches_reference(self):
        z = self.z.float().clone().requires_grad_(True)
        seesaw_cross_entropy(z, self.labels, self.counts, 0.8, 2.0, 0.01).sum().backward()
        ref = reference_grad(self.z.numpy(), self.labels, self.counts.numpy(), 0.8, 2.0, 0.01)
        np.testing.assert_allclose(z.grad.double().numpy(), ref, rtol=1e-3, atol=1e-4)

    def test_mitigation_shrinks_tail_negative_gradient(self):
        # A head-class (0) sample pushes on tail class 5; a larger p must push less.
        z = torch.zeros(1, self.C)
        labels = torch.tensor([0])
        grads = []
        for p in [0.0, 0.4, 0.8, 1.6]:
            zz = z.clone().requires_grad_(True)
            seesaw_cross_entropy(zz, labels, self.counts, p, 0.0, 0.01).sum().backward()
            grads.append(zz.grad[0, 5].item())
        self.assertTrue(all(g > 0 for g in grads))
        self.assertTrue(all(a > b for a, b in zip(grads, grads[1:])), grads)

    def test_compensation_grows_penalty_of_misclassified(self):
        # A sample of class 4 that scores class 2 higher: its loss grows with q.
        z = torch.tensor([[0.0, 0.0, 3.0, 0.0, 0.5, 0.0, 0.0]])
        labels = torch.tensor([4])
        losses = [
            seesaw_cross_entropy(z, labels, self.counts, 0.0, q, 0.01).item()
            for q in [0.0, 1.0, 2.0, 3.0]
        ]
        self.assertTrue(all(a < b for a, b in zip(losses, losses[1:])), losses)

    def test_losses_split_and_normalisation(self):
        C = self.C
        logits = torch.randn(10, C + 2, generator=torch.Generator().manual_seed(1))
        gt = torch.tensor([0, 3, C, C, 6, C, 1, C, C, 2])
        counts = self.counts + count_foreground(gt, C)
        loss_cls, loss_obj = seesaw_losses(logits, gt, counts, 0.8, 2.0, 0.01)
        fg = (gt < C).numpy()
        ref = reference_seesaw_ce(logits[fg, :C].numpy(), gt[fg], counts.numpy(), 0.8, 2.0, 0.01)
        self.assertAlmostEqual(loss_cls.item(), ref.sum() / 10, places=5)
        obj = logits[:, C:].double()
        logp = obj - torch.logsumexp(obj, dim=1, keepdim=True)
        ref_obj = -(logp[torch.arange(10), torch.from_numpy((~fg).astype(np.int64))]).sum() / 10
        self.assertAlmostEqual(loss_obj.item(), ref_obj.item(), places=5)

    def test_empty_and_all_background(self):
        C = self.C
        empty = torch.zeros(0, C + 2, requires_grad=True)
        loss_cls, loss_obj = seesaw_losses(empty, torch.zeros(0, dtype=torch.long), self.counts)
        self.assertEqual(loss_cls.item(), 0.0)
        self.assertEqual(loss_obj.item(), 0.0)
        (loss_cls + loss_obj).backward()
        self.assertEqual(empty.grad.shape, (0, C + 2))

        logits = torch.randn(5, C + 2, requires_grad=True)
        bg = torch.full((5,), C)
        loss_cls, loss_obj = seesaw_losses(logits, bg, self.counts)
        self.assertEqual(loss_cls.item(), 0.0)
        self.assertGreater(loss_obj.item(), 0.0)
        (loss_cls + loss_obj).backward()
        self.assertTrue(torch.all(logits.grad[:, :C] == 0))
        self.assertTrue(torch.all(torch.isfinite(logits.grad)))

    def test_count_foreground(self):
        gt = torch.tensor([2, 2, 5, 0, 5, 5, 7, 7])  # 7 = background for C = 7
        expected = np.zeros(7, dtype=np.int64)
        for g in gt.tolist():
            if g < 7:
                expected[g] += 1
        np.testing.assert_array_equal(count_foreground(gt, 7).numpy(), expected)

    def test_probs(self):
        C = self.C
        logits = torch.randn(9, C + 2, generator=torch.Generator().manual_seed(2)) * 4
        probs = seesaw_probs(logits)
        self.assertEqual(probs.shape, (9, C + 1))
        torch.testing.assert_close(probs.sum(1), torch.ones(9))
        cls = torch.exp(logits[:, :C]) / torch.exp(logits[:, :C]).sum(1, keepdim=True)
        obj = torch.exp(logits[:, C:]) / torch.exp(logits[:, C:]).sum(1, keepdim=True)
        torch.testing.assert_close(probs[:, :C], cls * obj[:, :1])
        torch.testing.assert_close(probs[:, C], obj[:, 1])

    def test_bad_params(self):
        bad = [(-0.1, 2.0, 0.01), (0.8, -1, 0.01), (0.8, 2.0, 0.0), (0.8, 2.0, 2.0)]
        bad += [(float("inf"), 2.0, 0.01), (0.8, float("nan"), 0.01), (True, 2.0, 0.01)]
        for p, q, eps in bad:
            with self.assertRaises(ConfigError):
                check_seesaw_params(p, q, eps)
        check_seesaw_params(0.0, 0.0, 0.01)

    def test_autocast_fp32(self):
        logits = torch.randn(6, self.C + 2).bfloat16()
        gt = torch.tensor([0, 1, self.C, 2, self.C, 3])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_cls, loss_obj = seesaw_losses(logits, gt, self.counts)
        self.assertEqual(loss_cls.dtype, torch.float32)
        self.assertEqual(loss_obj.dtype, torch.float32)


if __name__ == "__main__":
    unittest.main()
