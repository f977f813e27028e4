# Copyright (c) fasa_seesaw contributors.
"""
Two processes, each with its own shard of training RoIs and held-out RoIs, end with the same
FASA banks and probabilities as one process fed the union: on the CPU with gloo, and (on a
machine with CUDA, as dev/device_check.sh runs them) with the state on the GPU, all-reduced by
gloo on one GPU and by NCCL across two.
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
        box = torch.tensor([[1.0, 1.0, 20.0, 20.0]], device=x.device)
        inst.proposal_boxes = Boxes(box.repeat(len(gt), 1))
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


def run(model, train_batches, held_batches, n_passes=2, device="cpu"):
    hook = FASAAdaptationHook(None, "unused", period=1, clustering="none")
    hook._loader = held_batches
    with EventStorage(0) as storage:
        hook.trainer = type("T", (), {"model": model, "storage": storage})()
        for p in range(n_passes):
            for x, gt in train_batches[p::n_passes]:
                model((x.to(device), gt.to(device)))
            hook.adapt()
    bank = {k: v.cpu() for k, v in model.pred.fasa.bank.state_dict().items()}
    return bank, model.pred.fasa.probs.cpu().clone()


def _worker(rank, world, init_file, out, backend="gloo", gpus=0):
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    device = f"cuda:{rank % gpus}" if gpus else "cpu"
    if gpus:
        torch.cuda.set_device(device)
    try:
        train = [(x[rank::2], gt[rank::2]) for x, gt in shard_data(1)]
        held = [(x[rank::2].to(device), gt[rank::2].to(device)) for x, gt in shard_data(2)]
        bank, probs = run(TinyModel().to(device), train, held, device=device)
        torch.save({"bank": bank, "probs": probs}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


class TestFASADistributed(unittest.TestCase):
    def test_two_processes_equal_one_process_on_union(self):
        self.check_two_processes("gloo", gpus=0)

    @unittest.skipIf(not torch.cuda.is_available(), "no CUDA device")
    def test_cuda_state_all_reduced_by_gloo(self):
        self.check_two_processes("gloo", gpus=1)  # both processes on one GPU

    @unittest.skipIf(torch.cuda.device_count() < 2, "NCCL needs a GPU per process: 2 GPUs")
    def test_cuda_state_all_reduced_by_nccl(self):
        self.check_two_processes("nccl", gpus=2)

    def check_two_processes(self, backend, gpus):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "state")
            init = os.path.join(d, "init")
            spawn_gloo(_worker, (2, init, out, backend, gpus), 2, init)
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
