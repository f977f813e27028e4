# Copyright (c) fasa_seesaw contributors.
"""FASA's adaptation: held-out split, clustering, and a validation pass that changes nothing."""

import contextlib
import numpy as np
import os
import random
import tempfile
import types
import unittest
from unittest import mock
import torch

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from fasa_seesaw import ConfigError, add_fasa_seesaw_config
from fasa_seesaw.data.datasets import register_lvis_json_dataset
from fasa_seesaw.data.heldout import is_heldout, register_heldout_split
from fasa_seesaw.data.synth import SMOKE, ensure_generated
from fasa_seesaw.engine import FASAAdaptationHook, cluster_classes, fasa_modules
from fasa_seesaw.engine.fasa_hook import meanshift_bandwidth
from fasa_seesaw.engine.rng import get_rng_states, set_rng_states

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
        # 73 of the 153 pairwise distances lie within a blob: a bandwidth at the 0.4 quantile
        # joins each blob and keeps them apart.
        self._check_two_blobs(
            cluster_classes(self.means, self.seen, "meanshift", 0, bandwidth_quantile=0.4)
        )
        # A fixed bandwidth overrides the quantile: wider than the blobs' distance, one group.
        groups = cluster_classes(self.means, self.seen, "meanshift", 0, bandwidth=100.0)
        self.assertEqual(len(set(groups[:18])), 1)

    def test_bandwidth_rule(self):
        x = self.means[:18]
        d = sorted(
            float(np.sqrt(((x[i] - x[j]) ** 2).sum())) for i in range(18) for j in range(i + 1, 18)
        )
        for q in (0.05, 0.1, 0.5):
            self.assertAlmostEqual(meanshift_bandwidth(x, 0.0, q), float(np.quantile(d, q)), 9)
        self.assertEqual(meanshift_bandwidth(x, 2.5, 0.1), 2.5)
        # A smaller quantile never gives fewer groups.
        counts = [
            len(set(cluster_classes(self.means, self.seen, "meanshift", 0, bandwidth_quantile=q)))
            for q in (0.02, 0.1, 0.4)
        ]
        self.assertEqual(counts, sorted(counts, reverse=True))

    def test_affinity_fallback_when_not_converged(self):
        # Random points on which AffinityPropagation (damping 0.5) does not converge: class-wise
        # groups and a warning naming the setting, instead of degenerate groups.
        means = np.random.default_rng(0).normal(size=(162, 20))
        seen = np.ones(162, bool)
        with self.assertLogs("fasa_seesaw.engine.fasa_hook", "WARNING") as logs:
            groups = cluster_classes(means, seen, "affinity", 0)
        np.testing.assert_array_equal(groups, np.arange(162))
        self.assertIn("AFFINITY_DAMPING", "\n".join(logs.output))
        # Raising the damping, as the warning says, makes it converge into real groups.
        groups = cluster_classes(means, seen, "affinity", 0, affinity_damping=0.9)
        self.assertLess(len(set(groups)), 162)

    def test_affinity_reference_is_the_official_call(self):
        from sklearn.cluster import AffinityPropagation

        m = self.means
        distance = ((m[:, None, :] - m[None, :, :]) ** 2).sum(-1)
        labels = AffinityPropagation(random_state=1, affinity="precomputed").fit(distance).labels_
        groups = cluster_classes(m.astype(np.float32), self.seen, "affinity_reference", 0)
        expected = [{i for i, v in enumerate(labels) if v == k} for k in set(labels)]
        got = [set(np.flatnonzero(groups == g)) for g in set(groups)]
        self.assertEqual(sorted(map(sorted, got)), sorted(map(sorted, expected)))

    def test_affinity_reference_without_clusters_moves_nothing(self):
        # scikit-learn labels every point -1 when it finds no exemplar; the official code then
        # has no group and changes no probability that pass, but keeps the pass as baseline.
        from fasa_seesaw.engine import fasa_hook

        with mock.patch.object(fasa_hook, "_affinity", return_value=(np.full(19, -1), False)):
            groups = cluster_classes(self.means, self.seen, "affinity_reference", 0)
        np.testing.assert_array_equal(groups, np.full(19, -1))
        fasa = types.SimpleNamespace(
            bank=types.SimpleNamespace(
                mean=torch.from_numpy(self.means).float(), seen=torch.from_numpy(self.seen)
            ),
            probs=torch.full((19,), 0.5),
        )
        hook = FASAAdaptationHook(None, "unused", period=1, clustering="affinity_reference")
        counts = np.ones(20)
        hook.apply([fasa], [(np.ones(20), counts)])
        with mock.patch.object(fasa_hook, "_affinity", return_value=(np.full(19, -1), False)):
            hook.apply([fasa], [(np.full(20, 5.0), counts)])  # every loss rose
        torch.testing.assert_close(fasa.probs, torch.full((19,), 0.5))
        self.assertEqual(hook.prev[0][0][0], 5.0)
        hook.apply([fasa], [(np.ones(20), counts)])  # compared with that pass: losses fell
        self.assertTrue(bool((fasa.probs[:18] > 0.5).any()))

    def test_each_pass_is_recorded_with_its_groups(self):
        # A hook registered with a trainer appends every pass to fasa_adaptation.jsonl: the
        # groups it formed and how many classes moved, counted here from the probabilities.
        import json
        import tempfile

        from detectron2.config import CfgNode

        fasa = types.SimpleNamespace(
            bank=types.SimpleNamespace(
                mean=torch.from_numpy(self.means).float(), seen=torch.from_numpy(self.seen)
            ),
            probs=torch.full((19,), 0.05, dtype=torch.float64),
        )
        with tempfile.TemporaryDirectory() as out:
            cfg = CfgNode({"OUTPUT_DIR": out})
            hook = FASAAdaptationHook(cfg, "unused", period=1, clustering="none")
            hook.apply([fasa], [(np.ones(20), np.ones(20))])  # no trainer: nothing written
            self.assertFalse(os.path.exists(os.path.join(out, "fasa_adaptation.jsonl")))
            hook.trainer = types.SimpleNamespace(iter=9)
            sums = np.ones(20)
            sums[:5], sums[5:19] = 2.0, 0.5  # 5 classes' losses rose, 14 fell (class-wise)
            before = fasa.probs.clone()
            hook.apply([fasa], [(sums, np.ones(20))])
            with open(os.path.join(out, "fasa_adaptation.jsonl")) as f:
                (rec,) = [json.loads(line) for line in f]
        up = int((fasa.probs > before).sum())
        down = int((fasa.probs < before).sum())
        self.assertEqual((up, down), (14, 5))
        self.assertEqual((rec["moved_up"], rec["moved_down"]), (up, down))
        self.assertEqual((rec["pass"], rec["iteration"], rec["stage"]), (2, 10, 0))
        self.assertEqual(rec["num_groups"], 19)
        self.assertEqual(rec["group_sizes"], [1] * 19)
        self.assertAlmostEqual(rec["p_sum"], float(fasa.probs.sum()))

    def test_old_hook_state_starts_a_new_baseline(self):
        # Saved before the background count was kept: C-length arrays, not C + 1.
        hook = FASAAdaptationHook(None, "unused", period=1)
        old = {
            "passes": 2,
            "prev": [(torch.ones(19, dtype=torch.float64), torch.ones(19, dtype=torch.float64))],
            "groups": [torch.arange(19)],
        }
        with self.assertLogs("fasa_seesaw.engine.fasa_hook", "WARNING"):
            hook.load_state_dict(old)
        self.assertIsNone(hook.prev)
        self.assertEqual(hook.passes, 2)

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


class _RecordingLoader:
    """A loader with no images that records the numpy draw a mapper would make first."""

    def __init__(self, seen):
        self.seen = seen

    def __iter__(self):
        self.seen.append(float(np.random.rand()))
        return iter(())


def assert_same_rng_states(test, a, b):
    test.assertEqual(set(a), set(b))
    test.assertEqual(a["python"], b["python"])
    for x, y in zip(a["numpy"], b["numpy"]):  # (kind, keys, position, has_gauss, cached)
        test.assertTrue(np.array_equal(x, y))
    test.assertTrue(torch.equal(a["torch"], b["torch"]))
    for name in set(a) - {"python", "numpy", "torch"}:
        test.assertEqual(len(a[name]), len(b[name]))
        for x, y in zip(a[name], b[name]):
            test.assertTrue(torch.equal(x, y), name)


class TestRNGStates(unittest.TestCase):
    def test_every_generator_is_restored(self):
        from fasa_seesaw.engine.rng import preserved_rng_states

        if torch.cuda.is_available():
            torch.cuda.init()  # generators of an uninitialised device are not tracked
        before = get_rng_states()
        with preserved_rng_states():
            random.random()
            np.random.rand()
            torch.rand(1)
            for i in range(torch.cuda.device_count()):
                torch.rand(1, device=f"cuda:{i}")
            inside = get_rng_states()
        self.assertNotEqual(before["python"], inside["python"])
        self.assertFalse(torch.equal(before["torch"], inside["torch"]))
        assert_same_rng_states(self, before, get_rng_states())

    @unittest.skipIf(not torch.cuda.is_available(), "no CUDA device")
    def test_cuda_generators_are_captured(self):
        from fasa_seesaw.engine.rng import preserved_rng_states

        before = torch.cuda.get_rng_state_all()
        self.assertIn("cuda", get_rng_states())
        with preserved_rng_states():
            for i in range(torch.cuda.device_count()):
                torch.randn(8, device=f"cuda:{i}")
            self.assertFalse(torch.equal(before[0], torch.cuda.get_rng_state_all()[0]))
        for x, y in zip(before, torch.cuda.get_rng_state_all()):
            self.assertTrue(torch.equal(x, y))


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

    def test_control_trains_on_the_images_fasa_trains_on(self):
        # FASA_SEESAW.HOLD_OUT_FASA_SPLIT: a config without FASA trains on the same carve as a
        # FASA config with the same HELDOUT_FRACTION and SEED (the study's *_heldout controls).
        from fasa_seesaw import add_fasa_seesaw_config
        from fasa_seesaw.engine.fasa_hook import configure_fasa_heldout

        name = "test_heldout_control_src"
        DatasetCatalog.register(name, lambda: [{"image_id": i} for i in range(300)])

        def resolved(fasa, control):
            cfg = get_cfg()
            add_fasa_seesaw_config(cfg)
            cfg.DATASETS.TRAIN = (name,)
            cfg.MODEL.FASA.ENABLED = fasa
            cfg.MODEL.FASA.ADAPT.HELDOUT_FRACTION = 0.05
            cfg.FASA_SEESAW.HOLD_OUT_FASA_SPLIT = control
            return configure_fasa_heldout(cfg)

        plain, control, fasa = resolved(False, False), resolved(False, True), resolved(True, False)
        self.assertEqual(plain.DATASETS.TRAIN, (name,))
        self.assertEqual(control.DATASETS.TRAIN, fasa.DATASETS.TRAIN)
        images = {d["image_id"] for d in DatasetCatalog.get(control.DATASETS.TRAIN[0])}
        expected = {i for i in range(300) if not is_heldout(i, 0.05, 0)}  # the rule, again
        self.assertEqual(images, expected)
        self.assertLess(len(images), 300)
        self.assertEqual(control.MODEL.FASA.ADAPT.HELDOUT_DATASET, "")  # no pass without FASA


class TestValidationPass(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        paths = ensure_generated(SMOKE)  # the session's data root (tests/conftest.py)
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
                "OUTPUT_DIR", cls._tmp.name,
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
        rng = get_rng_states()
        hook = FASAAdaptationHook(self.cfg, "test_fasa_pass_val", period=1)
        fasas, stats = hook.validation_losses(model)
        self.assertEqual(len(fasas), 1)
        self.assertIs(fasas[0], model.roi_heads.box_predictor.fasa)
        sums, counts = stats[0]
        self.assertGreater(counts.sum(), 0)
        self.assertTrue(np.all(np.isfinite(sums)))
        after = model.state_dict()
        for k, v in before.items():
            self.assertTrue(torch.equal(v, after[k]), k)
        assert_same_rng_states(self, rng, get_rng_states())
        self.assertTrue(model.training)
        self.assertTrue(all(m.training for m in model.modules()))
        self.assertFalse(fasas[0].collecting)
        self.assertFalse(fasas[0].bank.frozen)

    @unittest.skipIf(not torch.cuda.is_available(), "no CUDA device")
    def test_pass_restores_cuda_generators(self):
        # On an accelerator detectron2 samples RoIs with the device's generator: the pass must
        # leave it (and every other generator) where it was.
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = "cuda"
        model = build_model(cfg)
        model.load_state_dict(self.model.state_dict())
        model.train()
        hook = FASAAdaptationHook(cfg, "test_fasa_pass_val", period=1)
        before = get_rng_states()
        self.assertIn("cuda", before)
        hook.validation_losses(model)
        assert_same_rng_states(self, before, get_rng_states())
        from fasa_seesaw.engine import fasa_hook

        with mock.patch.object(fasa_hook, "preserved_rng_states", contextlib.nullcontext):
            hook.validation_losses(model)
        moved = torch.cuda.get_rng_state_all()
        set_rng_states(before)
        self.assertFalse(all(torch.equal(a, b) for a, b in zip(before["cuda"], moved)))

    def test_augment_switch(self):
        # AUGMENT False: the held-out images are the same whatever the generators' state;
        # AUGMENT True: the training augmentations (random flip) apply, as in the reference.
        def first_images(augment):
            hook = FASAAdaptationHook(self.cfg, "test_fasa_pass_val", period=1, augment=augment)
            loader = hook._build_loader()
            images = []
            for seed in range(8):
                np.random.seed(seed)
                images.append(next(iter(loader))[0]["image"])
            return images

        plain = first_images(False)
        # With AUGMENT, each pass seeds the draws from (SEED, pass number): passes differ, and
        # the same pass number repeats its draws (as after a resume).
        hook = FASAAdaptationHook(self.cfg, "test_fasa_pass_val", period=1, augment=True)
        seen = []
        with mock.patch.object(hook, "_build_loader", return_value=_RecordingLoader(seen)):
            for passes in (0, 1, 0):
                hook.passes = passes
                hook.validation_losses(self.model)
        self.assertNotEqual(seen[0], seen[1])
        self.assertEqual(seen[0], seen[2])
        self.assertTrue(all(torch.equal(plain[0], x) for x in plain))
        augmented = first_images(True)
        self.assertFalse(all(torch.equal(augmented[0], x) for x in augmented))

    def test_pass_draws_from_generators_it_restores(self):
        # Without the restore, the pass would move numpy's generator (the test-size resize draws
        # from it in the main process) and torch's (RoI sampling): the restore is needed.
        from fasa_seesaw.engine import fasa_hook

        hook = FASAAdaptationHook(self.cfg, "test_fasa_pass_val", period=1)
        rng = get_rng_states()
        with mock.patch.object(fasa_hook, "preserved_rng_states", contextlib.nullcontext):
            hook.validation_losses(self.model)
        moved = get_rng_states()
        set_rng_states(rng)
        self.assertNotEqual(
            (rng["numpy"][1].tolist(), rng["numpy"][2]),
            (moved["numpy"][1].tolist(), moved["numpy"][2]),
        )
        self.assertFalse(torch.equal(rng["torch"], moved["torch"]))

    def test_adapt_moves_probabilities_by_group_loss(self):
        model = self.model
        hook = FASAAdaptationHook(self.cfg, "test_fasa_pass_val", period=1, clustering="none")
        with EventStorage(0) as storage:
            hook.trainer = types.SimpleNamespace(model=model, storage=storage)
            fasa = fasa_modules(model)[0]
            fasa.probs.fill_(0.5)
            hook.adapt()  # first pass: nothing to compare with
            torch.testing.assert_close(fasa.probs, torch.full((12,), 0.5))
            sums, counts = hook.prev[0]
            self.assertEqual(len(sums), 13)  # 12 classes + background
            self.assertGreater(counts[12], 0)  # background RoIs are counted
            seen = counts[:12] > 0
            # Pretend the previous pass was worse for even classes and better for odd ones
            # (classes without RoIs: the same zero both times).
            prev_sums = sums.copy()
            prev_sums[0:12:2] = np.where(seen[0::2], sums[0:12:2] * 2 + 1, 0.0)
            prev_sums[1:12:2] = sums[1:12:2] * 0.5
            hook.prev = [(prev_sums, counts)]
            hook.adapt()
            logged = storage.latest()
        p = fasa.probs.numpy()
        for c in range(12):
            if not seen[c]:
                self.assertAlmostEqual(p[c], 0.5, places=6)
            elif c % 2 == 0:
                self.assertAlmostEqual(p[c], 0.55, places=6)
            elif sums[c] > 0:
                self.assertAlmostEqual(p[c], 0.45, places=6)
        self.assertEqual(hook.passes, 2)
        self.assertEqual(logged["fasa/num_groups"][0], 12.0)
        self.assertEqual(logged["fasa/largest_group"][0], 1.0)
        state = hook.state_dict()
        fresh = FASAAdaptationHook(self.cfg, "test_fasa_pass_val", period=1)
        fresh.load_state_dict(state)
        self.assertEqual(fresh.passes, 2)


if __name__ == "__main__":
    unittest.main()
