# Copyright (c) fasa_seesaw contributors.
"""
--resume continues the same run: train k iterations, stop, resume for m more, and compare the
per-iteration losses and the final state with k + m uninterrupted iterations (FASA + Seesaw, with
warm-up ending and adaptation passes inside the window).
"""

import os
import tempfile
import unittest
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase

from fasa_seesaw import add_fasa_seesaw_config
from fasa_seesaw.data.datasets import register_lvis_json_dataset
from fasa_seesaw.data.synth import SMOKE, ensure_generated
from fasa_seesaw.engine import Trainer
from fasa_seesaw.engine.fasa_hook import configure_fasa_heldout

pytestmark = pytest.mark.slow  # training, subprocesses or several processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = os.path.join(ROOT, "configs/quickstart/mask_rcnn_R_18_FPN_fasa_seesaw_quickstart.yaml")
MAX_ITER, STOP_AFTER = 7, 4


class _Record(HookBase):
    def __init__(self):
        self.losses = {}

    def after_step(self):
        self.losses[self.trainer.iter] = self.trainer.storage.history("total_loss").latest()


class _Stop(HookBase):
    """Simulates a crash right after the checkpoint of iteration STOP_AFTER."""

    def after_step(self):
        if self.trainer.iter + 1 == STOP_AFTER:
            raise KeyboardInterrupt("stop")


def make_cfg(out):
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(
        [
            "DATASETS.TRAIN", "('test_resume_train',)",
            "DATASETS.TEST", "()",
            "MODEL.ROI_HEADS.NUM_CLASSES", "12",
            "INPUT.MIN_SIZE_TRAIN", "(48, 64)", "INPUT.MAX_SIZE_TRAIN", "64",
            "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", str(MAX_ITER),
            "SOLVER.STEPS", "(5,)", "SOLVER.WARMUP_ITERS", "2",
            "SOLVER.CHECKPOINT_PERIOD", str(STOP_AFTER),
            "DATALOADER.NUM_WORKERS", "1",
            "MODEL.FASA.WARMUP_ITERS", "3", "MODEL.FASA.ADAPT.PERIOD", "2",
            "MODEL.FASA.ADAPT.HELDOUT_FRACTION", "0.1",
            "FASA_SEESAW.PROGRESS_PERIOD", "0",
            "OUTPUT_DIR", out,
        ]
    )  # fmt: skip
    configure_fasa_heldout(cfg)
    cfg.freeze()
    return cfg


def run(cfg, resume, stop=False):
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    record = _Record()
    hooks = [record] + ([_Stop()] if stop else [])
    trainer.register_hooks(hooks)
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    return record.losses, trainer.model.state_dict()


class TestResume(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        paths = ensure_generated(SMOKE)  # the session's data root (tests/conftest.py)
        if "test_resume_train" not in DatasetCatalog.list():
            register_lvis_json_dataset(
                "test_resume_train", paths["train_json"], paths["train_image_root"]
            )

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_resume_gives_the_same_run(self):
        torch.manual_seed(0)
        full, full_state = run(make_cfg(os.path.join(self._tmp.name, "full")), resume=False)
        self.assertEqual(sorted(full), list(range(MAX_ITER)))

        out = os.path.join(self._tmp.name, "stopped")
        torch.manual_seed(0)
        first, _ = run(make_cfg(out), resume=False, stop=True)
        self.assertEqual(sorted(first), list(range(STOP_AFTER)))
        torch.manual_seed(123)  # whatever the new process's RNG is, the checkpoint's wins
        second, resumed_state = run(make_cfg(out), resume=True)
        self.assertEqual(sorted(second), list(range(STOP_AFTER, MAX_ITER)))

        for it in range(MAX_ITER):
            got = first[it] if it < STOP_AFTER else second[it]
            self.assertAlmostEqual(got, full[it], places=5, msg=f"iteration {it}")
        for k, v in full_state.items():
            torch.testing.assert_close(resumed_state[k], v, rtol=1e-5, atol=1e-6, msg=k)
        for key in ("fasa.probs", "fasa.bank.mean", "cls_loss.class_counts"):
            self.assertIn("roi_heads.box_predictor." + key, full_state)


if __name__ == "__main__":
    unittest.main()
