# Copyright (c) fasa_seesaw contributors.
"""
Loading and writing checkpoints: evaluation refuses weights that do not fit the config (each
case of a head of another shape, a missing head, no weights), unreadable files and a dangling
``last_checkpoint`` get one message each, and a failed write leaves the earlier file intact.
"""

import argparse
import os
import tempfile
import unittest
import torch

from detectron2.config import get_cfg

from fasa_seesaw import add_fasa_seesaw_config
from fasa_seesaw.engine import Trainer
from fasa_seesaw.engine.checkpoint import (
    CheckpointError,
    CrashSafeCheckpointer,
    atomic_write,
    check_resume_files,
    check_weights_file,
    final_iteration,
    load_for_eval,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(config, *opts):
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs/quickstart", config))
    cfg.merge_from_list(["MODEL.ROI_HEADS.NUM_CLASSES", "12", *opts])
    torch.manual_seed(0)
    return Trainer.build_model(cfg)


def tensor_count(path):
    """Tensors in a checkpoint's model (the plain models of ``CrashSafeCheckpointer`` tests)."""
    return len(torch.load(path, weights_only=True)["model"])


def save(model, path):
    torch.save({"model": model.state_dict(), "trainer": {"iteration": 3}}, path)


class TestEvalRefusesWrongWeights(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.dir = cls._tmp.name
        cls.ce = build("mask_rcnn_R_18_FPN_ce_quickstart.yaml")
        cls.seesaw = build("mask_rcnn_R_18_FPN_seesaw_quickstart.yaml")
        cls.paths = {}
        for name, model in (("ce", cls.ce), ("seesaw", cls.seesaw)):
            cls.paths[name] = os.path.join(cls.dir, f"{name}.pth")
            save(model, cls.paths[name])
        wide = build("mask_rcnn_R_18_FPN_ce_quickstart.yaml", "MODEL.ROI_HEADS.NUM_CLASSES", "30")
        cls.paths["ce30"] = os.path.join(cls.dir, "ce30.pth")
        save(wide, cls.paths["ce30"])
        fasa = build("mask_rcnn_R_18_FPN_fasa_seesaw_quickstart.yaml")
        cls.paths["fasa_seesaw"] = os.path.join(cls.dir, "fasa_seesaw.pth")
        save(fasa, cls.paths["fasa_seesaw"])

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_matching_weights_load_exactly(self):
        model = build("mask_rcnn_R_18_FPN_seesaw_quickstart.yaml")
        torch.manual_seed(1)  # other weights than the checkpoint's
        for p in model.parameters():
            p.data.normal_()
        load_for_eval(model, self.paths["seesaw"])
        for k, v in self.seesaw.state_dict().items():
            torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)

    def test_a_seesaw_checkpoint_in_a_ce_config_and_the_reverse(self):
        for weights, config in (
            ("seesaw", "mask_rcnn_R_18_FPN_ce_quickstart.yaml"),
            ("ce", "mask_rcnn_R_18_FPN_seesaw_quickstart.yaml"),
        ):
            with self.subTest(weights=weights):
                with self.assertRaises(CheckpointError) as cm:
                    load_for_eval(build(config), self.paths[weights])
                msg = str(cm.exception)
                self.assertIn("does not fit the model this config builds", msg)
                # CE: 12 + 1 outputs; Seesaw: 12 + 2, both named.
                ckpt, model = (14, 13) if weights == "seesaw" else (13, 14)
                self.assertIn(f"box_predictor.cls_score.weight: checkpoint ({ckpt}, ", msg)
                self.assertIn(f"model ({model}, ", msg)
                self.assertNotIn("missing from the checkpoint", msg)  # only another shape

    def test_a_30_class_checkpoint_in_a_12_class_config(self):
        with self.assertRaises(CheckpointError) as cm:
            load_for_eval(build("mask_rcnn_R_18_FPN_ce_quickstart.yaml"), self.paths["ce30"])
        msg = str(cm.exception)
        self.assertIn("cls_score.weight: checkpoint (31, 256), model (13, 256)", msg)
        self.assertIn("mask_head.predictor.weight: checkpoint (30, ", msg)

    def test_training_state_may_be_missing_or_extra(self):
        # A FASA + Seesaw checkpoint evaluates in the Seesaw config (its bank is training state)
        # and the Seesaw one in the FASA + Seesaw config (the bank stays as built).
        load_for_eval(build("mask_rcnn_R_18_FPN_seesaw_quickstart.yaml"), self.paths["fasa_seesaw"])
        load_for_eval(build("mask_rcnn_R_18_FPN_fasa_seesaw_quickstart.yaml"), self.paths["seesaw"])

    def test_a_missing_head_is_refused(self):
        state = torch.load(self.paths["ce"], weights_only=True)
        state["model"] = {k: v for k, v in state["model"].items() if "mask_head" not in k}
        path = os.path.join(self.dir, "no_mask.pth")
        torch.save(state, path)
        with self.assertRaisesRegex(CheckpointError, "missing from the checkpoint: .*mask_head"):
            load_for_eval(build("mask_rcnn_R_18_FPN_ce_quickstart.yaml"), path)

    def test_no_weights_is_refused_unless_asked_for(self):
        model = build("mask_rcnn_R_18_FPN_ce_quickstart.yaml")
        with self.assertRaisesRegex(CheckpointError, "MODEL.WEIGHTS is empty.*--eval-untrained"):
            load_for_eval(model, "")
        load_for_eval(model, "", allow_untrained=True)

    def test_files_that_are_not_checkpoints(self):
        model = build("mask_rcnn_R_18_FPN_ce_quickstart.yaml")
        with open(self.paths["ce"], "rb") as f:
            data = f.read()
        cases = {
            "truncated.pth": data[: len(data) // 2],
            "empty.pth": b"",
            "text.pth": b"not a checkpoint\n",
        }
        for name, content in cases.items():
            with self.subTest(name=name):
                path = os.path.join(self.dir, name)
                with open(path, "wb") as f:
                    f.write(content)
                with self.assertRaisesRegex(CheckpointError, "is not a readable checkpoint"):
                    load_for_eval(model, path)
        with self.assertRaisesRegex(CheckpointError, "does not exist"):
            load_for_eval(model, os.path.join(self.dir, "nowhere.pth"))

    def test_legacy_format_cut_short_or_holding_objects(self):
        """torch's legacy (pickle) format cut at any point is a damaged file, with one message;
        a whole one whose trainer state holds a Python object is the caller's decision."""
        model = build("mask_rcnn_R_18_FPN_ce_quickstart.yaml")
        small = {"model": {"w": torch.randn(4, 4)}, "trainer": {"iteration": 3}}
        path = os.path.join(self.dir, "legacy.pth")
        torch.save(small, path, _use_new_zipfile_serialization=False)
        with open(path, "rb") as f:
            data = f.read()
        checkpointer = CrashSafeCheckpointer(model)
        for cut in range(1, len(data), 3):  # EOF, struct, index and unpickling errors among them
            with open(path, "wb") as f:
                f.write(data[:cut])
            with self.assertRaisesRegex(CheckpointError, "is not a readable checkpoint", msg=cut):
                checkpointer._torch_load(path)
        for obj in (argparse.Namespace(lr=0.1), range(3)):  # a module's class; a builtin
            for legacy in (True, False):
                small["trainer"]["args"] = obj
                torch.save(small, path, _use_new_zipfile_serialization=not legacy)
                with self.assertRaisesRegex(CheckpointError, "holds Python objects.*trusted"):
                    load_for_eval(model, path)


class TestCheckpointFiles(unittest.TestCase):
    def test_atomic_write_keeps_the_old_file_when_writing_fails(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "model_final.pth")
            atomic_write(path, lambda f: f.write(b"old"))

            def fail(f):
                f.write(b"half")
                raise OSError(28, "No space left on device")

            with self.assertRaises(OSError):
                atomic_write(path, fail)
            with open(path, "rb") as f:
                self.assertEqual(f.read(), b"old")
            self.assertEqual(os.listdir(d), ["model_final.pth"])

    def test_disk_full_while_saving_says_what_to_do(self):
        # The temporary file is a link to /dev/full: every write fails with ENOSPC, as on a disk
        # that is full.
        with tempfile.TemporaryDirectory() as d:
            ckpt = CrashSafeCheckpointer(torch.nn.Linear(2, 2), d, save_to_disk=True)
            ckpt.save("model_0000009")
            os.symlink("/dev/full", os.path.join(d, "model_0000019.pth.tmp"))
            with self.assertRaisesRegex(CheckpointError, "the disk is full"):
                ckpt.save("model_0000019")
            self.assertEqual(sorted(os.listdir(d)), ["last_checkpoint", "model_0000009.pth"])
            with open(os.path.join(d, "last_checkpoint")) as f:
                self.assertEqual(f.read(), "model_0000009.pth")
            self.assertEqual(tensor_count(os.path.join(d, "model_0000009.pth")), 2)
            # The checkpoint written, then the disk full when last_checkpoint is updated: the
            # message says which is which; last_checkpoint still names the earlier one.
            os.symlink("/dev/full", os.path.join(d, "last_checkpoint.tmp"))
            with self.assertRaisesRegex(CheckpointError, "was written, but last_checkpoint could"):
                ckpt.save("model_0000029")
            self.assertEqual(tensor_count(os.path.join(d, "model_0000029.pth")), 2)
            with open(os.path.join(d, "last_checkpoint")) as f:
                self.assertEqual(f.read(), "model_0000009.pth")

    def test_weights_file_checked_before_any_process_starts(self):
        with tempfile.TemporaryDirectory() as d:
            with self.assertRaisesRegex(CheckpointError, "MODEL.WEIGHTS is empty"):
                check_weights_file("")
            check_weights_file("", allow_untrained=True)
            with self.assertRaisesRegex(CheckpointError, "does not exist"):
                check_weights_file(os.path.join(d, "nowhere.pth"))
            good = os.path.join(d, "good.pth")
            torch.save({"model": {}}, good)
            check_weights_file(good)
            check_weights_file(good + "?matching_heuristics=True")  # detectron2's query
            with open(good, "rb") as f:
                data = f.read()
            bad = os.path.join(d, "bad.pth")
            with open(bad, "wb") as f:
                f.write(data[: len(data) // 2])
            with self.assertRaisesRegex(CheckpointError, "is not a readable checkpoint"):
                check_weights_file(bad)

    def test_last_checkpoint_empty_or_dangling(self):
        with tempfile.TemporaryDirectory() as d:
            tag = os.path.join(d, "last_checkpoint")
            self.assertIsNone(check_resume_files(d))
            open(os.path.join(d, "model_0000004.pth"), "wb").close()
            open(os.path.join(d, "model_final.pth.tmp"), "wb").close()
            open(os.path.join(d, "study_run.json.tmp"), "wb").close()  # not ours: kept
            for content, words in (("", "is empty"), ("model_0000009.pth", "which is not in")):
                with open(tag, "w") as f:
                    f.write(content)
                with self.assertRaisesRegex(CheckpointError, words + ".*found: model_0000004.pth"):
                    check_resume_files(d)
            self.assertNotIn("model_final.pth.tmp", os.listdir(d))  # a killed save's leftover
            self.assertIn("study_run.json.tmp", os.listdir(d))
            with open(tag, "w") as f:
                f.write("model_0000004.pth\n")
            self.assertEqual(check_resume_files(d), os.path.join(d, "model_0000004.pth"))

    def test_final_iteration(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "model_final.pth")
            self.assertIsNone(final_iteration(path))
            torch.save({"model": {}, "trainer": {"iteration": 19}}, path)
            self.assertEqual(final_iteration(path), 19)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            self.assertIsNone(final_iteration(path))


if __name__ == "__main__":
    unittest.main()
