# Copyright (c) fasa_seesaw contributors.
"""
Two gloo processes, each with its own shard of training RoIs and held-out RoIs, end with the
same FASA banks and probabilities as one process fed the union.
"""

import os
import tempfile
import unittest
import pytest
import torch
import torch.distributed as dist
from torch import nn

from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from fasa_seesaw.engine import FASAAdaptationHook
from fasa_seesaw.testing import TOY_COUNTS as COUNTS
from fasa_seesaw.testing import spawn_gloo
from fasa_seesaw.testing import toy_fasa_seesaw_predictor as make_predictor

pytestmark = pytest.mark.slow  # training, subprocesses or several processes

C, D = len(COUNTS), 8  # the toy predictor's classes and feature size


class TinyModel(nn.Module):
    """Stands in for GeneralizedRCNN: the predictor sees features and labelled proposals."""

    def __init__(self):
        super().__init__()
        self.pred = make_predictor()

    def forward(self, batch):
        x, gt = batch
        inst = Instances((32, 32))
        inst.proposal_boxes = Boxes(torch.tensor([[1.0, 1.0, 20.0, 20.0]]).repeat(len(gt), 1))
        inst.gt_boxes = inst.proposal_boxes
        inst.gt_classes = gt
        return self.pred.losses(self.pred(x), [inst])


def shard_data(seed, n_batches=4, n=10):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        gt = torch.randint(0, C + 1, (n,), generator=g)
        x = torch.randn(n, D, generator=g) + gt[:, None].float()
        out.append((x, gt))
    return out


def run(model, train_batches, held_batches, n_passes=2):
    hook = FASAAdaptationHook(None, "unused", period=1, clustering="none")
    hook._loader = held_batches
    with EventStorage(0) as storage:
        hook.trainer = type("T", (), {"model": model, "storage": storage})()
        for p in range(n_passes):
            for batch in train_batches[p::n_passes]:
                model(batch)
            hook.adapt()
    return model.pred.fasa.bank.state_dict(), model.pred.fasa.probs.clone()


def _worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        train = [(x[rank::2], gt[rank::2]) for x, gt in shard_data(1)]
        held = [(x[rank::2], gt[rank::2]) for x, gt in shard_data(2)]
        bank, probs = run(TinyModel(), train, held)
        torch.save({"bank": bank, "probs": probs}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


class TestFASADistributed(unittest.TestCase):
    def test_two_processes_equal_one_process_on_union(self):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "state")
            spawn_gloo(_worker, (2, os.path.join(d, "init"), out), 2, os.path.join(d, "init"))
            states = [torch.load(f"{out}.{r}") for r in range(2)]
        bank, probs = run(TinyModel(), shard_data(1), shard_data(2))
        inv = 1.0 / torch.tensor(COUNTS, dtype=torch.float64)
        self.assertFalse(torch.allclose(probs.double(), inv / inv.sum()), "nothing adapted")
        for s in states:
            torch.testing.assert_close(s["probs"], probs, rtol=1e-6, atol=1e-7)
            for k in ("mean", "var", "count"):
                torch.testing.assert_close(s["bank"][k], bank[k], rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    unittest.main()
