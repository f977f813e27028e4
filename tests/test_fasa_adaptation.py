# Copyright (c) fasa_seesaw contributors.
"""FASA's adaptation: held-out split, clustering, and a validation pass that changes nothing."""

import numpy as np
import os
import tempfile
import types
import unittest
import torch

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from fasa_seesaw import ConfigError, add_fasa_seesaw_config
from fasa_seesaw.data.datasets import register_lvis_json_dataset
from fasa_seesaw.data.heldout import is_heldout, register_heldout_split
from fasa_seesaw.data.longtail_synth import SMOKE, dataset_paths, ensure_generated
from fasa_seesaw.engine import FASAAdaptationHook, cluster_classes, fasa_predictors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/quickstart/mask_rcnn_R_18_FPN_fasa_seesaw_quickstart.yaml")


class TestClustering(unittest.TestCase):
    def setUp(self):
        rng = np.random.default_rng(0)
        a = rng.normal(0, 0.05, size=(10, 6))
        b = rng.normal(5, 0.05, size=(8, 6))
        self.means = np.concatenate([a, b, np.zeros((1, 6))])
        self.seen = np.array([True] * 18 + [False])

    def _check_two_blobs(self, groups):
        self.assertEqual(len(set(groups[:10])), 1, groups)
        self.assertEqual(len(set(groups[10:18])), 1, groups)
        self.assertNotEqual(groups[0], groups[10])
        self.assertNotIn(groups[18], set(groups[:18]))  # unseen: a group of its own

    def test_meanshift(self):
        self._check_two_blobs(cluster_classes(self.means, self.seen, "meanshift", 0))

    def test_affinity_given_similarities(self):
        # The number of exemplars depends on AP's preference; what must hold is that no group
        # mixes the two blobs (given distances instead of similarities, AP would do just that).
        groups = cluster_classes(self.means, self.seen, "affinity", 0)
        self.assertFalse(set(groups[:10]) & set(groups[10:18]), groups)
        self.assertNotIn(groups[18], set(groups[:18]))

    def test_classwise_and_unknown(self):
        np.testing.assert_array_equal(cluster_classes(self.means, self.seen, "none", 0), range(19))
        with self.assertRaisesRegex(ConfigError, "CLUSTERING"):
            cluster_classes(self.means, self.seen, "kmeans", 0)


class TestHeldout(unittest.TestCase):
    def test_split_is_deterministic_and_disjoint(self):
        ids = list(range(1, 2001))
        held = {i for i in ids if is_heldout(i, 0.1, 3)}
        self.assertEqual(held, {i for i in ids if is_heldout(i, 0.1, 3)})
        self.assertAlmostEqual(len(held) / len(ids), 0.1, delta=0.02)
        self.assertNotEqual(held, {i for i in ids if is_heldout(i, 0.1, 4)})

    def test_registered_splits_partition_the_dataset(self):
        name = "test_heldout_src"
        DatasetCatalog.register(name, lambda: [{"image_id": i} for i in range(200)])
        fit, held = register_heldout_split(name, 0.2, 0)
        a = {d["image_id"] for d in DatasetCatalog.get(fit)}
        b = {d["image_id"] for d in DatasetCatalog.get(held)}
        self.assertFalse(a & b)
        self.assertEqual(a | b, set(range(200)))
        with self.assertRaisesRegex(ConfigError, "HELDOUT_FRACTION"):
            register_heldout_split(name, 1.0, 0)


class TestValidationPass(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        ensure_generated(SMOKE, cls._tmp.name)
        paths = dataset_paths(SMOKE, cls._tmp.name)
        for split in ("train", "val"):
            name = f"test_fasa_pass_{split}"
            if name not in DatasetCatalog.list():
                register_lvis_json_dataset(
                    name, paths[f"{split}_json"], paths[f"{split}_image_root"]
                )
        cfg = get_cfg()
        add_fasa_seesaw_config(cfg)
        cfg.merge_from_file(CONFIG)
        cfg.merge_from_list(
            [
                "MODEL.ROI_HEADS.NUM_CLASSES", "12",
                "DATASETS.TRAIN", "('test_fasa_pass_train',)",
                "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
                "DATALOADER.NUM_WORKERS", "0",
            ]
        )  # fmt: skip
        cls.cfg = cfg
        torch.manual_seed(0)
        cls.model = build_model(cfg)
        cls.model.train()
        # A few training forwards so that counts, banks and BN statistics are not trivial.
        from detectron2.data import DatasetMapper, build_detection_test_loader

        loader = build_detection_test_loader(
            DatasetCatalog.get("test_fasa_pass_train")[:4], mapper=DatasetMapper(cfg, is_train=True)
        )
        with EventStorage(0):
            for inputs in loader:
                cls.model(inputs)

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_pass_changes_no_statistic(self):
        model = self.model
        before = {k: v.clone() for k, v in model.state_dict().items()}
        rng = torch.get_rng_state()
        hook = FASAAdaptationHook(self.cfg, "test_fasa_pass_val", period=1)
        predictors, stats = hook.validation_losses(model)
        self.assertEqual(len(predictors), 1)
        sums, counts = stats[0]
        self.assertGreater(counts.sum(), 0)
        self.assertTrue(np.all(np.isfinite(sums)))
        after = model.state_dict()
        for k, v in before.items():
            self.assertTrue(torch.equal(v, after[k]), k)
        self.assertTrue(torch.equal(rng, torch.get_rng_state()))
        self.assertTrue(model.training)
        self.assertTrue(all(m.training for m in model.modules()))
        self.assertIsNone(predictors[0].val_collect)

    def test_adapt_moves_probabilities_by_group_loss(self):
        model = self.model
        hook = FASAAdaptationHook(self.cfg, "test_fasa_pass_val", period=1, clustering="none")
        with EventStorage(0) as storage:
            hook.trainer = types.SimpleNamespace(model=model, storage=storage)
            pred = fasa_predictors(model)[0]
            pred.fasa_probs.fill_(0.5)
            hook.adapt()  # first pass: nothing to compare with
            torch.testing.assert_close(pred.fasa_probs, torch.full((12,), 0.5))
            sums, counts = hook.prev[0]
            seen = counts > 0
            # Pretend the previous pass was worse for even classes and better for odd ones.
            prev_sums = sums.copy()
            prev_sums[0::2] = sums[0::2] * 2 + 1
            prev_sums[1::2] = sums[1::2] * 0.5
            hook.prev = [(prev_sums, counts)]
            hook.adapt()
            logged = storage.latest()
        p = pred.fasa_probs.numpy()
        for c in range(12):
            if not seen[c]:
                self.assertAlmostEqual(p[c], 0.5, places=6)
            elif c % 2 == 0:
                self.assertAlmostEqual(p[c], 0.55, places=6)
            elif sums[c] > 0:
                self.assertAlmostEqual(p[c], 0.45, places=6)
        self.assertEqual(hook.passes, 2)
        self.assertIn("fasa/num_groups", logged)
        state = hook.state_dict()
        fresh = FASAAdaptationHook(self.cfg, "test_fasa_pass_val", period=1)
        fresh.load_state_dict(state)
        self.assertEqual(fresh.passes, 2)


if __name__ == "__main__":
    unittest.main()
