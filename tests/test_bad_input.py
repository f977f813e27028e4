# Copyright (c) fasa_seesaw contributors.
"""
Bad input gets one message that names it and the fix: datasets that are not registered or
whose json is missing, an OUTPUT_DIR that is a file or cannot be written, image files that are
missing or corrupt (found by --check-data before a run, or by training when it reaches them),
and the records of an earlier run that never wrote a checkpoint, which a new run sets aside
instead of appending to.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
import pytest
from PIL import Image

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from fasa_seesaw import ConfigError, add_fasa_seesaw_config
from fasa_seesaw.data.check import check_image_files
from fasa_seesaw.data.datasets import register_lvis_json_dataset
from fasa_seesaw.data.resumable import PositionedMapDataset
from fasa_seesaw.data.synth import SMOKE, ensure_generated
from fasa_seesaw.engine import check_datasets, check_output_dir
from fasa_seesaw.errors import DataError, is_project_error, user_message

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raise_a_data_error(rank):
    raise DataError("image 'b.png': missing.\n  Fix: x")


def _cfg(**datasets):
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    cfg.DATASETS.TRAIN = datasets.get("train", ("longtail_synth_smoke_train",))
    cfg.DATASETS.TEST = datasets.get("test", ())
    return cfg


class BrokenCopy:
    """A copy of the smoke dataset with one training image deleted, one truncated and one of
    another size than its json entry."""

    def __init__(self, root):
        paths = ensure_generated(SMOKE)
        self.train_root = os.path.join(root, "train")
        shutil.copytree(paths["train_image_root"], self.train_root)
        self.json = os.path.join(root, "train.json")
        shutil.copy(paths["train_json"], self.json)
        with open(self.json) as f:
            names = sorted(img["file_name"] for img in json.load(f)["images"])
        self.missing = os.path.join(self.train_root, names[0])
        self.truncated = os.path.join(self.train_root, names[1])
        self.resized = os.path.join(self.train_root, names[2])
        os.remove(self.missing)
        with open(self.truncated, "r+b") as f:
            f.truncate(300)
        Image.new("RGB", (32, 48)).save(self.resized)


class TestBadInput(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.tmp = cls._tmp.name
        cls.broken = BrokenCopy(os.path.join(cls.tmp, "broken"))
        if "test_bad_input_train" not in DatasetCatalog.list():
            register_lvis_json_dataset(
                "test_bad_input_train", cls.broken.json, cls.broken.train_root
            )

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_unknown_dataset(self):
        with self.assertRaisesRegex(ConfigError, "DATASETS.TRAIN names 'nope'.*--dataset"):
            check_datasets(_cfg(train=("nope",)))
        with self.assertRaisesRegex(ConfigError, "DATASETS.TEST names 'nada'"):
            check_datasets(_cfg(test=("nada",)))
        check_datasets(_cfg())  # a built-in dataset: its json is written when it is first used

    @unittest.skipIf(
        os.path.isfile(MetadataCatalog.get("lvis_v1_train").json_file), "LVIS is installed here"
    )
    def test_registered_dataset_whose_json_is_missing(self):
        # detectron2's own LVIS registration, without the files.
        with self.assertRaisesRegex(ConfigError, r"does not exist.*DETECTRON2_DATASETS"):
            check_datasets(_cfg(train=("lvis_v1_train",)))

    def test_output_dir_that_is_a_file_or_cannot_be_written(self):
        path = os.path.join(self.tmp, "a_file")
        open(path, "w").close()
        cfg = _cfg()
        cfg.OUTPUT_DIR = path
        with self.assertRaisesRegex(ConfigError, "is a file, not a folder"):
            check_output_dir(cfg, resume=False)
        cfg.OUTPUT_DIR = os.path.join(path, "below_a_file")
        with self.assertRaisesRegex(ConfigError, "cannot be written"):
            check_output_dir(cfg, resume=False)

    def test_an_earlier_runs_records_are_set_aside_not_appended_to(self):
        out = os.path.join(self.tmp, "killed_before_first_checkpoint")
        os.makedirs(out)
        for name in ("metrics.json", "fasa_adaptation.jsonl"):
            with open(os.path.join(out, name), "w") as f:
                f.write('{"iteration": 3}\n')
        cfg = _cfg()
        cfg.OUTPUT_DIR = out
        for resume in (False, True):  # --resume without a checkpoint also starts at 0
            check_output_dir(cfg, resume=resume)
            self.assertFalse(os.path.exists(os.path.join(out, "metrics.json")))
        # --resume with a model_final.pth but no last_checkpoint: says so, not "pass --resume".
        open(os.path.join(out, "model_final.pth"), "w").close()
        with self.assertRaisesRegex(ConfigError, "--resume found no last_checkpoint"):
            check_output_dir(cfg, resume=True)
        os.remove(os.path.join(out, "model_final.pth"))
        # A periodic checkpoint whose last_checkpoint is gone is not overwritten either.
        open(os.path.join(out, "model_0000099.pth"), "w").close()
        for resume, words in ((False, "already holds model_0000099.pth"), (True, "found no")):
            with self.assertRaisesRegex(ConfigError, words):
                check_output_dir(cfg, resume=resume)
        os.remove(os.path.join(out, "model_0000099.pth"))
        kept = sorted(os.listdir(out))
        self.assertEqual(len(kept), 2, kept)
        self.assertTrue(kept[0].startswith("fasa_adaptation.earlier-"), kept)
        self.assertTrue(kept[1].startswith("metrics.earlier-") and kept[1].endswith(".json"))

    def test_check_data_finds_each_bad_file(self):
        total, bad = check_image_files(["test_bad_input_train"])["test_bad_input_train"]
        self.assertEqual(total, 120)
        found = dict(bad)
        b = self.broken
        self.assertEqual(set(found), {b.missing, b.truncated, b.resized})
        self.assertEqual(found[b.missing], "missing")
        self.assertIn("truncated", found[b.truncated])
        self.assertIn("32x48 pixels, the json says 64x64", found[b.resized])

    def test_training_reports_an_unreadable_image_with_the_dataset_and_count(self):
        dicts = DatasetCatalog.get("test_bad_input_train")
        index = next(i for i, d in enumerate(dicts) if d["file_name"] == self.broken.missing)

        def mapper(d):
            open(d["file_name"], "rb").close()  # as detectron2's read_image opens it
            return d

        data = PositionedMapDataset(dicts, mapper, seed=0, rank=0, names=("test_bad_input_train",))
        with self.assertRaises(DataError) as cm:
            data[(0, index)]
        msg = str(cm.exception)
        self.assertIn(f"training image '{self.broken.missing}' could not be read", msg)
        self.assertIn("In DATASETS.TRAIN ('test_bad_input_train',), 1 of 120 image files", msg)
        self.assertIn("--check-data", msg)

    def test_user_message_of_an_error_raised_in_a_loader_worker(self):
        wrapped = DataError(
            "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent "
            'call last):\n  File "x.py", line 1, in f\nfasa_seesaw.errors.DataError: training '
            "image 'a.png' could not be read (missing).\n"
        )
        self.assertEqual(
            user_message(wrapped), "training image 'a.png' could not be read (missing)."
        )
        self.assertEqual(user_message(ConfigError("plain")), "plain")
        # From a process of detectron2's launch (torch's ProcessRaisedException), a message of
        # several lines.
        raised = RuntimeError(
            "\n\n-- Process 1 terminated with the following error:\nTraceback (most recent call "
            'last):\n  File "w.py", line 2, in g\nfasa_seesaw.engine.checkpoint.CheckpointError: '
            "MODEL.WEIGHTS 'x.pth' does not fit:\n  a: checkpoint (14, 8), model (13, 8)\n"
        )
        self.assertEqual(
            user_message(raised),
            "MODEL.WEIGHTS 'x.pth' does not fit:\n  a: checkpoint (14, 8), model (13, 8)",
        )
        self.assertTrue(is_project_error(raised))
        self.assertFalse(is_project_error(RuntimeError("CUDA out of memory")))
        # A bug raised while a project error was handled is the error to show, whole.
        chained = RuntimeError(
            'Traceback (most recent call last):\n  File "a.py", line 1, in f\n'
            "fasa_seesaw.errors.ConfigError: a setting\n\nDuring handling of the above "
            "exception, another exception occurred:\n\nTraceback (most recent call last):\n"
            "  File \"b.py\", line 2, in g\nKeyError: 'x'\n"
        )
        self.assertEqual(user_message(chained), str(chained))
        self.assertFalse(is_project_error(chained))

    def test_user_message_of_an_error_raised_in_a_spawned_process(self):
        """The exception torch's spawn (which detectron2's launch uses) really raises."""
        import torch.multiprocessing as mp

        with self.assertRaises(Exception) as caught:
            mp.spawn(_raise_a_data_error, nprocs=1)
        self.assertIn("Traceback", str(caught.exception))
        self.assertEqual(user_message(caught.exception), "image 'b.png': missing.\n  Fix: x")
        self.assertTrue(is_project_error(caught.exception))

    @pytest.mark.slow  # subprocesses
    def test_train_net_on_broken_data_is_one_message(self):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        config = os.path.join(ROOT, "configs/quickstart/mask_rcnn_R_18_FPN_ce_quickstart.yaml")
        base = [
            sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", config,
            "--dataset", f"broken={self.broken.json}:{self.broken.train_root}",
        ]  # fmt: skip
        opts = [
            "DATASETS.TRAIN", "('broken',)", "DATASETS.TEST", "()",
            "MODEL.ROI_HEADS.NUM_CLASSES", "12", "INPUT.MIN_SIZE_TRAIN", "(64,)",
            "INPUT.MAX_SIZE_TRAIN", "64", "SOLVER.IMS_PER_BATCH", "8", "SOLVER.MAX_ITER", "60",
            "DATALOADER.NUM_WORKERS", "1", "OUTPUT_DIR", os.path.join(self.tmp, "broken_run"),
        ]  # fmt: skip
        check = subprocess.run(
            base + ["--check-data"] + opts, capture_output=True, text=True, env=env
        )
        self.assertEqual(check.returncode, 1, check.stderr[-2000:])
        self.assertIn("broken: 117 of 120 images are readable", check.stdout)
        train = subprocess.run(base + opts, capture_output=True, text=True, env=env)
        self.assertNotEqual(train.returncode, 0)
        self.assertIn("could not be read", train.stderr)
        self.assertIn("1 of 120 image files are missing", train.stderr)
        self.assertNotIn("Traceback", train.stdout + train.stderr)


if __name__ == "__main__":
    unittest.main()
