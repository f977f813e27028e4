# Copyright (c) fasa_seesaw contributors.
"""
Multi-process training end to end, through train_net.py and detectron2's launch on the gloo
backend: 2 processes with Seesaw + FASA (adaptation included) end with the same long-tail state
on every rank, with counts that are the sum of what each rank saw; a resume of the 2-process
run continues it exactly; and detectron2's multi-machine path (2 "machines" of 1 process on
loopback) trains the same run as 2 processes on one machine.
"""

import os
import socket
import subprocess
import sys
import tempfile
import unittest
import pytest
import torch

from fasa_seesaw.testing import SMOKE_OPTS, checkpoint_model

pytestmark = pytest.mark.slow  # training, subprocesses or several processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/quickstart/mask_rcnn_R_18_FPN_fasa_seesaw_quickstart.yaml")
# FrozenBN, as the LVIS configs: with "BN" each process keeps its own running statistics.
OPTS = SMOKE_OPTS + [
    "DATASETS.TEST", "()", "MODEL.RESNETS.NORM", "FrozenBN", "SOLVER.IMS_PER_BATCH", "4",
    "SOLVER.STEPS", "(5,)", "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "100000",
    "DATALOADER.NUM_WORKERS", "0", "MODEL.FASA.WARMUP_ITERS", "3", "MODEL.FASA.ADAPT.PERIOD", "2",
    "FASA_SEESAW.PROGRESS_PERIOD", "0", "MODEL.BACKBONE.FREEZE_AT", "5",
]  # fmt: skip
MAX_ITER = 8
LONG_TAIL_STATE = ("cls_loss.class_counts", "fasa.probs", "fasa.bank.mean", "fasa.bank.var")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(script, out, max_iter, *launch_args, resume=False):
    return (
        [sys.executable, os.path.join(ROOT, script), *launch_args, "--config-file", CONFIG]
        + (["--resume"] if resume else [])
        + OPTS
        + ["SOLVER.MAX_ITER", str(max_iter), "OUTPUT_DIR", out]
    )


def run(cmd, **env):
    env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def final_model(out):
    return checkpoint_model(os.path.join(out, "model_final.pth"))


class TestMultiProcess(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.tmp = cls._tmp.name
        cls.out = {k: os.path.join(cls.tmp, k) for k in ("probe", "resumed", "machines")}
        # 2 processes, each writing its state at the end (tests/ddp_probe.py).
        probe = ("tests/ddp_probe.py", MAX_ITER, "--num-gpus", "2")
        cls.probe = run(command(probe[0], cls.out["probe"], *probe[1:]))
        # The same run stopped after iteration 5 (checkpoint at 3; 5 is past a FASA pass) and
        # resumed with train_net.py itself.
        stopped = ["SOLVER.CHECKPOINT_PERIOD", "4"]
        cls.first = run(
            command(probe[0], cls.out["resumed"], *probe[1:]) + stopped,
            FASA_SEESAW_PROBE_STOP_AFTER="5",
        )
        cls.second = run(
            command("train_net.py", cls.out["resumed"], MAX_ITER, "--num-gpus", "2", resume=True)
            + stopped
        )
        # 2 machines of 1 process each, on loopback.
        url = f"tcp://127.0.0.1:{free_port()}"

        def machine(rank):
            return ["--num-gpus", "1", "--num-machines", "2", "--machine-rank", str(rank)] + [
                "--dist-url",
                url,
            ]

        # Output to files: a full pipe would block one machine while the other waits for it.
        logs = [open(os.path.join(cls.tmp, f"machine{rank}.log"), "w+") for rank in (0, 1)]
        procs = [
            subprocess.Popen(
                command("train_net.py", cls.out["machines"], MAX_ITER, *machine(rank)),
                cwd=ROOT,
                env=dict(os.environ, OMP_NUM_THREADS="1"),
                stdout=logs[rank],
                stderr=subprocess.STDOUT,
                text=True,
            )
            for rank in (0, 1)
        ]
        cls.machines = []
        for p, log in zip(procs, logs):
            code = p.wait(timeout=600)
            log.seek(0)
            cls.machines.append((code, "", log.read()))
            log.close()

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_every_rank_holds_the_same_state_and_counts_sum_the_ranks(self):
        self.assertEqual(self.probe.returncode, 0, self.probe.stderr[-3000:])
        ranks = [
            torch.load(os.path.join(self.out["probe"], f"probe_rank{r}.pt"), weights_only=False)
            for r in (0, 1)
        ]
        a, b = ranks
        self.assertEqual(a["iter"], b["iter"])
        self.assertGreaterEqual(a["passes"], 2)  # adaptation ran (warm-up 3, every 2 steps)
        self.assertEqual(a["passes"], b["passes"])
        for g, h in zip(a["groups"], b["groups"]):
            self.assertTrue((g == h).all(), (g, h))
        self.assertEqual(set(a["state"]), set(b["state"]))
        for k, v in a["state"].items():
            self.assertTrue(torch.equal(v, b["state"][k]), k)
        prefix = "roi_heads.box_predictor."
        for key in LONG_TAIL_STATE:
            self.assertIn(prefix + key, a["state"])
        # Each rank counted its own RoIs (different ones); the counts are their sum.
        counts = a["state"][prefix + "cls_loss.class_counts"]
        own = [r["local_counts"] for r in ranks]
        self.assertFalse(torch.equal(own[0], own[1]))
        self.assertTrue(torch.equal(counts, own[0] + own[1]), (counts, own))
        self.assertGreater(int(own[0].sum()), 0)
        # The checkpoint holds that state.
        saved = final_model(self.out["probe"])
        for k, v in a["state"].items():
            self.assertTrue(torch.equal(saved[k], v), k)

    def test_a_resumed_2_process_run_continues_it_exactly(self):
        self.assertNotEqual(self.first.returncode, 0)
        self.assertIn("stopped after iteration 5", self.first.stderr)
        for r in (self.probe, self.second):
            self.assertEqual(r.returncode, 0, r.stderr[-3000:])
        self.assertIn("model_0000003.pth", self.second.stdout)  # a resume, not a fresh start
        self.assert_same_run(final_model(self.out["resumed"]), final_model(self.out["probe"]))

    def test_two_machines_on_loopback_train_the_same_run(self):
        for rank, (code, _out, err) in enumerate(self.machines):
            self.assertEqual(code, 0, f"machine {rank}: {err[-3000:]}")
        self.assertEqual(self.probe.returncode, 0)
        self.assert_same_run(final_model(self.out["machines"]), final_model(self.out["probe"]))

    def assert_same_run(self, got, expected):
        self.assertEqual(set(got), set(expected))
        for k, v in expected.items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)


if __name__ == "__main__":
    unittest.main()
