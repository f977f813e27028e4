# Copyright (c) fasa_seesaw contributors.
"""
Kill -9 during each step of a checkpoint write, then --resume: the run ends identical to one that
was never killed, no truncated file is ever left under a name that is read, and
``last_checkpoint`` always names a complete file. ``tests/kill_point.py`` lands the kill.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from concurrent.futures import ThreadPoolExecutor
import pytest
import torch

from fasa_seesaw.engine.checkpoint import final_iteration
from fasa_seesaw.testing import SMOKE_OPTS, checkpoint_model

pytestmark = pytest.mark.slow  # training, subprocesses or several processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/quickstart/mask_rcnn_R_18_FPN_fasa_seesaw_quickstart.yaml")
OPTS = SMOKE_OPTS + [
    "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.STEPS", "(5,)",
    "SOLVER.WARMUP_ITERS", "2", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.FASA.WARMUP_ITERS", "3", "MODEL.FASA.ADAPT.PERIOD", "2",
    "FASA_SEESAW.PROGRESS_PERIOD", "0",
    # A frozen backbone: smaller checkpoints and faster steps; the heads, Seesaw counts and FASA
    # state still train.
    "MODEL.BACKBONE.FREEZE_AT", "5",
]  # fmt: skip
# MAX_ITER 8 with a checkpoint every 4: model_0000003, then model_0000007 and model_final in the
# same step (the final save right after a periodic one). Each kill lands after model_0000003 is
# complete and named, so the resume starts from it.
PERIODIC = ["SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "4"]
KILLS = [
    ("mid_write", "model_0000007.pth"),
    ("after_rename", "model_0000007.pth"),
    ("mid_write", "last_checkpoint@2"),  # while it is rewritten to name model_0000007.pth
    ("mid_write", "model_final.pth"),
]


def train(out, opts, resume=False, kill=None):
    cmd = [sys.executable]
    cmd += [os.path.join(ROOT, "tests/kill_point.py"), *kill, "--"] if kill else []
    cmd += [] if kill else [os.path.join(ROOT, "train_net.py")]
    cmd += ["--config-file", CONFIG] + (["--resume"] if resume else [])
    cmd += OPTS + opts + ["OUTPUT_DIR", out]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


class TestKillAndResume(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.tmp = cls._tmp.name
        short = os.path.join(cls.tmp, "short")  # MAX_ITER 6 with no periodic checkpoint
        r = train(short, ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "100000"])
        assert r.returncode == 0, r.stderr[-3000:]
        cls.longer = {}
        for name in ("longer_reference", "longer_killed"):
            cls.longer[name] = os.path.join(cls.tmp, name)
            shutil.copytree(short, cls.longer[name])

        def periodic_kill(point_file):
            out = os.path.join(cls.tmp, "_".join(point_file).replace(".", "_"))
            killed = train(out, PERIODIC, kill=point_file)
            files = cls.files(out)
            resumed = train(out, PERIODIC, resume=True)
            return point_file, (killed, files, resumed, out)

        longer = ["SOLVER.MAX_ITER", "12", "SOLVER.CHECKPOINT_PERIOD", "100000"]

        def longer_kill():
            out = cls.longer["longer_killed"]
            killed = train(out, longer, resume=True, kill=("mid_write", "model_final.pth"))
            files = cls.files(out)
            return "longer", (killed, files, train(out, longer, resume=True), out)

        jobs = [lambda: ("reference", train(os.path.join(cls.tmp, "ref"), PERIODIC))]
        jobs += [lambda: ("longer_reference", train(cls.longer["longer_reference"], longer, True))]
        jobs += [lambda pf=pf: periodic_kill(pf) for pf in KILLS] + [longer_kill]
        with ThreadPoolExecutor(2) as pool:  # two single-threaded runs at a time
            cls.results = dict(pool.map(lambda job: job(), jobs))

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    @staticmethod
    def files(out):
        """After a kill: {name: iteration or None} of the .pth files, and last_checkpoint."""
        found = {n: final_iteration(os.path.join(out, n)) for n in os.listdir(out)}
        tag = os.path.join(out, "last_checkpoint")
        last = open(tag).read() if os.path.exists(tag) else None  # None: killed before any
        return {n: it for n, it in found.items() if n.endswith(".pth")}, last

    def check_killed_then_resumed(self, killed, files, resumed, out, reference):
        self.assertEqual(killed.returncode, -9, killed.stderr[-2000:])
        complete, last = files
        # Every file under a checkpoint name is complete; last_checkpoint names one of them.
        self.assertTrue(all(it is not None for it in complete.values()), complete)
        self.assertIn(last, complete)
        self.assertEqual(resumed.returncode, 0, resumed.stderr[-3000:])
        self.assertNotIn("Traceback", resumed.stderr)
        self.assertFalse([n for n in os.listdir(out) if n.endswith(".tmp")])
        final = os.path.join(out, "model_final.pth")
        self.assertEqual(final_iteration(final), final_iteration(reference))
        ref = checkpoint_model(reference)
        got = checkpoint_model(final)
        self.assertEqual(set(got), set(ref))
        for k, v in ref.items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
        with open(os.path.join(out, "last_checkpoint")) as f:
            self.assertEqual(f.read(), "model_final.pth")

    def test_references_trained(self):
        for name in ("reference", "longer_reference"):
            self.assertEqual(self.results[name].returncode, 0, self.results[name].stderr[-3000:])

    def test_kill_during_each_step_of_a_periodic_and_the_final_save(self):
        reference = os.path.join(self.tmp, "ref", "model_final.pth")
        for point_file in KILLS:
            with self.subTest(kill=point_file):
                self.check_killed_then_resumed(*self.results[point_file], reference)
        # Killed before model_0000007.pth was named: the resume went on from model_0000003.pth.
        for point_file in KILLS[:3]:
            _killed, (_complete, last), resumed, _out = self.results[point_file]
            self.assertEqual(last, "model_0000003.pth", point_file)
            self.assertIn("model_0000003.pth", resumed.stdout)
        # Killed while model_final.pth was written right after model_0000007.pth: the resume
        # starts at MAX_ITER and writes model_final.pth from the periodic checkpoint.
        resumed = self.results[("mid_write", "model_final.pth")][2]
        self.assertIn("model_final.pth is missing or older than iteration 7", resumed.stdout)

    def test_kill_while_a_longer_run_rewrites_model_final(self):
        # Trained to 6, resumed to 12, killed while model_final.pth is rewritten: the file of
        # iteration 5 stays whole and named, and the next resume finishes the run.
        killed, files, resumed, out = self.results["longer"]
        self.assertEqual(files[0].get("model_final.pth"), 5)
        reference = os.path.join(self.longer["longer_reference"], "model_final.pth")
        self.assertEqual(final_iteration(reference), 11)
        self.check_killed_then_resumed(killed, files, resumed, out, reference)

    def test_a_checkpoint_past_max_iter_leaves_model_final_alone(self):
        # A run finished at 6 (model_final.pth of iteration 5), extended and stopped after
        # model_0000007.pth, then resumed with the original MAX_ITER 6: nothing is trained and
        # the finished run's model_final.pth is not replaced by the later state.
        out = os.path.join(self.tmp, "past_max_iter")
        os.makedirs(out)
        shutil.copy(os.path.join(self.tmp, "short", "model_final.pth"), out)
        shutil.copy(os.path.join(self.tmp, "ref", "model_0000007.pth"), out)
        with open(os.path.join(out, "last_checkpoint"), "w") as f:
            f.write("model_0000007.pth")
        with open(os.path.join(out, "model_final.pth"), "rb") as f:
            before = f.read()
        r = train(out, ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "100000"], True)
        self.assertEqual(r.returncode, 0, r.stderr[-3000:])
        self.assertIn("past SOLVER.MAX_ITER 6: nothing is trained", r.stdout + r.stderr)
        with open(os.path.join(out, "model_final.pth"), "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(final_iteration(os.path.join(out, "model_final.pth")), 5)


if __name__ == "__main__":
    unittest.main()
