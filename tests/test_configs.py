# Copyright (c) fasa_seesaw contributors.
"""Every yaml under configs/ loads and builds its model; bad configs fail with a clear message."""

import glob
import os
import re
import tempfile
import unittest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from fasa_seesaw import ConfigError, add_fasa_seesaw_config
from fasa_seesaw.config import RENAMED_KEYS, merge_config
from fasa_seesaw.engine import check_config
from fasa_seesaw.modeling import (
    EQLLoss,
    EQLv2Loss,
    LongTailCascadeROIHeads,
    LongTailFastRCNNOutputLayers,
    LongTailROIHeads,
    NormedConv2d,
    NormedLinear,
    SeesawLoss,
    box_predictors,
    resolve_cls_loss,
)
from fasa_seesaw.testing import toy_detection_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def load(path, opts=()):
    # As train_net.py loads configs: a renamed key in a shipped config would fail here.
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    return merge_config(cfg, path, list(opts))


def family(name):
    """(cascade, loss, FASA, normed mask, HTC-Lite) that a shipped config's file name promises."""
    name = name.replace("_fasa_release", "")  # where the weights come from, not the method
    if "eqlv2" in name:
        loss = "eqlv2"
    elif "_eql_" in name:
        loss = "eql"
    else:
        loss = "seesaw" if "seesaw" in name else "softmax_ce"
    normed = "normed_mask" in name or "normedmask" in name
    htc = "htc_lite" in name or "htc-lite" in name  # a cascade with a context encoder
    return ("cascade" in name or htc, loss, "fasa" in name, normed, htc)


class TestConfigs(unittest.TestCase):
    def test_found_configs(self):
        names = {os.path.basename(p) for p in CONFIGS}
        self.assertIn("mask_rcnn_R_50_FPN_2x_seesaw_rfs_lvis_v1.yaml", names)
        self.assertIn("cascade_mask_rcnn_R_101_FPN_2x_seesaw_random_lvis_v1.yaml", names)
        self.assertIn("mask_rcnn_R_18_FPN_seesaw_quickstart.yaml", names)

    def test_every_config_selects_its_method(self):
        """Every config loads (as train_net.py loads it) and names the head, loss, classifier,
        FASA and mask head its file name promises."""
        for path in CONFIGS:
            name = os.path.basename(path).lower()
            if name == "base-rcnn-fpn.yaml":
                continue  # a fragment: no dataset or class count of its own
            with self.subTest(config=os.path.relpath(path, ROOT)):
                cfg = load(path)
                if name in ("base-quickstart.yaml", "base-study.yaml"):
                    # Fragments with no method: Base-RCNN-FPN's detectron2 ROI head.
                    self.assertEqual(cfg.MODEL.ROI_HEADS.NAME, "StandardROIHeads")
                    continue
                cascade, loss, fasa, normed_mask, htc = family(name)
                self.assertEqual(
                    cfg.MODEL.ROI_HEADS.NAME,
                    "LongTailCascadeROIHeads" if cascade else "LongTailROIHeads",
                )
                self.assertEqual(resolve_cls_loss(cfg), loss)
                self.assertEqual(cfg.MODEL.ROI_BOX_HEAD.NORMED_CLASSIFIER, loss == "seesaw")
                self.assertEqual(cfg.MODEL.FASA.ENABLED, fasa)
                augmentation = [a for a in ("smote", "moex") if f"_{a}" in name] or ["gaussian"]
                self.assertEqual(cfg.MODEL.FASA.AUGMENTATION, augmentation[0])
                self.assertEqual(
                    cfg.MODEL.ROI_MASK_HEAD.NAME == "NormedMaskRCNNConvUpsampleHead", normed_mask
                )
                self.assertEqual(
                    cfg.TEST.AUG.ENABLED, name.endswith("_tta.yaml") or "_tta_" in name
                )
                self.assertEqual(cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED, "dual_head" in name)
                self.assertEqual(cfg.MODEL.GLOBAL_CONTEXT.ENABLED, htc)
                self.assertEqual(cfg.MODEL.META_ARCHITECTURE == "GlobalContextRCNN", htc)
                if htc or not cascade:  # (cascades choose their mask heads)
                    self.assertEqual(
                        cfg.MODEL.ROI_BOX_CASCADE_HEAD.MASK_HEADS, "last" if htc else "one"
                    )
                nr = "_nr_" in name  # NMS re-sampling
                self.assertEqual(cfg.MODEL.RPN.NMS_RESAMPLING.ENABLED, nr)
                self.assertEqual(cfg.MODEL.PROPOSAL_GENERATOR.NAME == "LongTailRPN", nr)

    def test_one_model_per_family_builds_with_its_outputs(self):
        """One config per (architecture, loss, FASA, mask head) family is built: predictor type,
        loss and FASA modules, and the shapes of scores, deltas and test-time probabilities."""
        chosen = {}
        for path in CONFIGS:
            name = os.path.basename(path).lower()
            if name.startswith("base-") or "dual_head" in name:  # (tests/test_dual_head.py)
                continue
            chosen.setdefault(family(name), path)
        # Mask R-CNN: CE, Seesaw, Seesaw + normed mask, FASA, FASA + Seesaw, EQL, EQLv2; Cascade:
        # CE, Seesaw, Seesaw + normed mask, FASA, EQL, EQLv2; HTC-Lite: CE, Seesaw.
        self.assertEqual(len(chosen), 15)
        torch.manual_seed(0)
        for (cascade, loss, fasa, normed_mask, htc), path in sorted(chosen.items()):
            with self.subTest(config=os.path.relpath(path, ROOT)):
                cfg = load(path, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
                model = build_model(cfg)
                C = cfg.MODEL.ROI_HEADS.NUM_CLASSES
                heads = model.roi_heads
                self.assertIsInstance(
                    heads, LongTailCascadeROIHeads if cascade else LongTailROIHeads
                )
                predictors = box_predictors(model)
                self.assertEqual(len(predictors), 3 if cascade else 1)
                for p in predictors:
                    self.assertIsInstance(p, LongTailFastRCNNOutputLayers)
                    sigmoid = {"eql": EQLLoss, "eqlv2": EQLv2Loss}
                    if loss == "seesaw":
                        self.assertIsInstance(p.cls_loss, SeesawLoss)
                        self.assertIsInstance(p.cls_score, NormedLinear)  # the recipe's
                    elif loss in sigmoid:
                        self.assertIsInstance(p.cls_loss, sigmoid[loss])
                        self.assertNotIsInstance(p.cls_score, NormedLinear)
                    else:
                        self.assertIsNone(p.cls_loss, "detectron2's loss expected")
                        self.assertNotIsInstance(p.cls_score, NormedLinear)
                    self.assertEqual(p.fasa is not None, fasa)
                    if fasa:
                        self.assertEqual(p.fasa.bank.feature_dim, p.cls_score.in_features)
                    p.eval()
                    x = torch.rand(5, p.cls_score.in_features)
                    with torch.no_grad():
                        scores, deltas = p(x)
                        probs = p.predict_probs((scores, deltas), [range(2), range(3)])
                    self.assertEqual(tuple(scores.shape), (5, C + (2 if loss == "seesaw" else 1)))
                    self.assertEqual(tuple(deltas.shape), (5, 4 if cascade else 4 * C))
                    self.assertEqual([tuple(t.shape) for t in probs], [(2, C + 1), (3, C + 1)])
                    if loss in sigmoid:  # independent sigmoid scores in [0, 1]
                        self.assertTrue(bool(((probs[0] >= 0) & (probs[0] <= 1)).all()))
                    else:
                        torch.testing.assert_close(probs[0].sum(1), torch.ones(2))
                if cascade:
                    for module in ("cls_loss", "fasa"):
                        held = [getattr(p, module) for p in predictors]
                        if held[0] is not None:
                            self.assertEqual(len({id(m) for m in held}), 3, "one per stage")
                self.assertEqual(getattr(heads, "global_context", None) is not None, htc)
                mask_heads = heads.mask_head
                if isinstance(mask_heads, torch.nn.ModuleList):  # a mask head per cascade stage
                    self.assertEqual(len(mask_heads), 3)
                else:
                    mask_heads = [mask_heads]
                for mask_head in mask_heads:
                    self.assertEqual(isinstance(mask_head.predictor, NormedConv2d), normed_mask)
                del model

    def test_study_ablations_change_one_setting(self):
        """Each ablation and control of the study differs from its base config in the setting
        it names (and OUTPUT_DIR), nothing else."""

        def flat(cfg, prefix=""):
            out = {}
            for k, v in cfg.items():
                if isinstance(v, dict):
                    out.update(flat(v, f"{prefix}{k}."))
                else:
                    out[prefix + k] = v
            return out

        study = os.path.join(ROOT, "configs", "study")
        files = {
            "cascade_seesaw": "cascade_mask_rcnn_R_18_FPN_seesaw_study.yaml",
            "htc_lite_seesaw": "htc_lite_R_18_FPN_seesaw_study.yaml",
        }
        cases = {
            ("fasa", "fasa_uniform"): {"MODEL.FASA.INIT_PROBS": "uniform"},
            ("fasa", "fasa_metric"): {"MODEL.FASA.ADAPT.SIGNAL": "metric"},
            ("fasa", "fasa_affinity"): {"MODEL.FASA.ADAPT.CLUSTERING": "affinity"},
            ("fasa", "fasa_classwise"): {"MODEL.FASA.ADAPT.CLUSTERING": "none"},
            ("ce", "ce_heldout"): {"FASA_SEESAW.HOLD_OUT_FASA_SPLIT": True},
            ("seesaw", "seesaw_heldout"): {"FASA_SEESAW.HOLD_OUT_FASA_SPLIT": True},
            ("fasa", "fasa_static"): {"MODEL.FASA.ADAPT.ENABLED": False},
            ("fasa_seesaw", "fasa_seesaw_static"): {"MODEL.FASA.ADAPT.ENABLED": False},
            ("fasa_seesaw", "fasa_seesaw_uniform"): {"MODEL.FASA.INIT_PROBS": "uniform"},
            ("fasa_seesaw", "fasa_seesaw_light"): {"MODEL.FASA.LOSS_WEIGHT": 0.02},
            ("ce", "nr"): {
                "MODEL.PROPOSAL_GENERATOR.NAME": "LongTailRPN",
                "MODEL.RPN.NMS_RESAMPLING.ENABLED": True,
            },
            ("fasa", "fasa_nr"): {
                "MODEL.PROPOSAL_GENERATOR.NAME": "LongTailRPN",
                "MODEL.RPN.NMS_RESAMPLING.ENABLED": True,
            },
            # The toolkit's losses: only the loss and its keys (EQLv2's keys at their defaults).
            ("ce", "eql"): {"MODEL.ROI_BOX_HEAD.CLS_LOSS": "eql", "MODEL.EQL.LAMBDA": 0.11},
            ("ce", "eqlv2"): {"MODEL.ROI_BOX_HEAD.CLS_LOSS": "eqlv2"},
            ("fasa", "fasa_smote"): {"MODEL.FASA.AUGMENTATION": "smote"},
            ("fasa", "fasa_moex"): {"MODEL.FASA.AUGMENTATION": "moex"},
            # The second stage: the dual head, RFS (the `rfs` row's threshold), half the
            # schedule, and weights from the `seesaw` run (set by the study, so none here).
            ("seesaw", "seesaw_dual_head"): {
                "MODEL.WEIGHTS": "",
                "MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED": True,
                "DATALOADER.SAMPLER_TRAIN": "RepeatFactorTrainingSampler",
                "DATALOADER.REPEAT_THRESHOLD": 0.1,
                "SOLVER.WARMUP_ITERS": 50,
                "SOLVER.MAX_ITER": 750,
                "SOLVER.STEPS": (500, 688),
                "SOLVER.CHECKPOINT_PERIOD": 250,
            },
            # HTC-Lite against the cascade, the cascade against Mask R-CNN.
            ("seesaw", "cascade_seesaw"): {
                "MODEL.ROI_HEADS.NAME": "LongTailCascadeROIHeads",
                "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": True,
            },
            ("cascade_seesaw", "htc_lite_seesaw"): {
                "MODEL.META_ARCHITECTURE": "GlobalContextRCNN",
                "MODEL.ROI_BOX_CASCADE_HEAD.MASK_HEADS": "last",
                "MODEL.GLOBAL_CONTEXT.ENABLED": True,
                "MODEL.GLOBAL_CONTEXT.CONV_DIM": 64,
            },
        }
        for (base, name), expected in cases.items():
            with self.subTest(config=name):
                a, b = (
                    flat(
                        load(
                            os.path.join(study, files.get(n, f"mask_rcnn_R_18_FPN_{n}_study.yaml"))
                        )
                    )
                    for n in (base, name)
                )
                diff = {k: b[k] for k in a if a[k] != b[k] and k != "OUTPUT_DIR"}
                if name.endswith("_heldout"):  # the carve FASA configs use
                    self.assertEqual(b["MODEL.FASA.ADAPT.HELDOUT_FRACTION"], 0.05)
                    diff.pop("MODEL.FASA.ADAPT.HELDOUT_FRACTION", None)
                self.assertEqual(diff, expected)

    def test_lvis_tta_scales(self):
        """The LVIS TTA variants: the Seesaw entry's scales, flipped, on their base recipe."""
        lvis = os.path.join(ROOT, "configs", "LVISv1-InstanceSegmentation")
        variants = glob.glob(os.path.join(lvis, "*_tta.yaml"))
        self.assertGreaterEqual(len(variants), 2)
        for path in variants:
            with self.subTest(config=os.path.basename(path)):
                cfg = load(path)
                self.assertEqual(tuple(cfg.TEST.AUG.MIN_SIZES), (1200, 1400, 1600, 1800, 2000))
                self.assertTrue(cfg.TEST.AUG.FLIP)
                self.assertEqual(cfg.TEST.AUG.MAX_SIZE, 3333)  # 2000 x 1333 / 800
                base = load(path.replace("_tta.yaml", ".yaml"))
                self.assertEqual(cfg.MODEL, base.MODEL)
                self.assertFalse(base.TEST.AUG.ENABLED)
                check_config(cfg)

    def test_lvis_recipe_values(self):
        cfg = load(
            os.path.join(
                ROOT,
                "configs/LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_seesaw_rfs_lvis_v1.yaml",
            )
        )
        self.assertEqual(cfg.MODEL.ROI_HEADS.NUM_CLASSES, 1203)
        self.assertEqual(cfg.SOLVER.MAX_ITER, 150000)
        self.assertEqual(tuple(cfg.SOLVER.STEPS), (100000, 137500))
        self.assertEqual(cfg.DATALOADER.SAMPLER_TRAIN, "RepeatFactorTrainingSampler")
        self.assertAlmostEqual(cfg.DATALOADER.REPEAT_THRESHOLD, 0.001)
        self.assertEqual(cfg.TEST.DETECTIONS_PER_IMAGE, 300)
        self.assertAlmostEqual(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST, 1e-4)
        self.assertEqual(tuple(cfg.INPUT.MIN_SIZE_TRAIN), (640, 672, 704, 736, 768, 800))
        self.assertEqual(cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE, 512)
        self.assertAlmostEqual(cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION, 0.25)


class TestConfigErrors(unittest.TestCase):
    QUICK = os.path.join(ROOT, "configs/quickstart/mask_rcnn_R_18_FPN_seesaw_quickstart.yaml")

    def test_num_classes_mismatch(self):
        cfg = load(self.QUICK, ["MODEL.ROI_HEADS.NUM_CLASSES", "31"])
        with self.assertRaisesRegex(ConfigError, r"NUM_CLASSES is 31 .* has 30 categories"):
            check_config(cfg)
        check_config(load(self.QUICK))

    def test_seesaw_with_sigmoid_or_fed_loss(self):
        for key in ("MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", "MODEL.ROI_BOX_HEAD.USE_FED_LOSS"):
            cfg = load(self.QUICK, [key, "True"])
            with self.assertRaisesRegex(ConfigError, "cannot be combined"):
                check_config(cfg)

    def test_renamed_keys_name_the_new_key(self):
        # In a config file, through _BASE_ from a shipped config.
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "old.yaml")
            with open(path, "w") as f:
                f.write(f'_BASE_: "{self.QUICK}"\nMODEL:\n  SEESAW:\n    TEMPERATURE: 20.0\n')
            cfg = get_cfg()
            add_fasa_seesaw_config(cfg)
            with self.assertRaisesRegex(
                ConfigError, r"MODEL\.SEESAW\.TEMPERATURE .*MODEL\.ROI_BOX_HEAD\.NORM_TEMP"
            ):
                merge_config(cfg, path)
        # On the command line, every renamed key.
        for old, new in RENAMED_KEYS.items():
            with self.subTest(key=old):
                cfg = get_cfg()
                add_fasa_seesaw_config(cfg)
                with self.assertRaisesRegex(ConfigError, rf"{re.escape(old)}\b.*{re.escape(new)}"):
                    merge_config(cfg, self.QUICK, [old, "1"])
        # The new keys merge.
        cfg = load(self.QUICK, ["MODEL.ROI_BOX_HEAD.NORM_TEMP", "10.0"])
        self.assertEqual(cfg.MODEL.ROI_BOX_HEAD.NORM_TEMP, 10.0)

    def test_seesaw_cls_loss_with_sigmoid_ce(self):
        cfg = load(self.QUICK, ["MODEL.ROI_BOX_HEAD.CLS_LOSS", "seesaw"])
        self.assertEqual(resolve_cls_loss(cfg), "seesaw")
        cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE = True
        with self.assertRaisesRegex(ConfigError, "CLS_LOSS 'seesaw'.*USE_SIGMOID_CE"):
            resolve_cls_loss(cfg)

    def test_invalid_p_q_eps(self):
        for key, value in (("P", "-0.5"), ("Q", "-1.0"), ("EPS", "0.0"), ("EPS", "1.5")):
            cfg = load(self.QUICK, [f"MODEL.SEESAW.{key}", value])
            with self.assertRaisesRegex(ConfigError, f"MODEL.SEESAW.{key}"):
                check_config(cfg)


class TestSeesawHeadsForward(unittest.TestCase):
    """Train and inference forward passes of the Seesaw ROI heads inside a real Mask R-CNN."""

    def _batch(self, n_images=2, size=64, seed=0):
        return toy_detection_batch(n_images, size, seed)

    def test_cascade_stages(self):
        from detectron2.utils.events import EventStorage

        path = os.path.join(
            ROOT, "configs/quickstart/cascade_mask_rcnn_R_18_FPN_seesaw_quickstart.yaml"
        )
        cfg = load(path, ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"])
        torch.manual_seed(0)
        model = build_model(cfg)
        model.train()
        with EventStorage():
            losses = model(self._batch())
        for k in range(3):
            for name in ("loss_cls", "loss_cls_objectness", "loss_box_reg"):
                self.assertIn(f"{name}_stage{k}", losses)
        sum(losses.values()).backward()
        counts = [p.cls_loss.class_counts.clone() for p in model.roi_heads.box_predictor]
        for c in counts:
            self.assertGreater(c.sum().item(), 0)
        model.eval()
        with torch.no_grad():
            out = model(self._batch(seed=1))
        for o in out:
            scores = o["instances"].scores
            self.assertTrue(bool(((scores >= 0) & (scores <= 1)).all()))
            self.assertTrue(o["instances"].has("pred_masks"))
        # inference leaves the counts alone
        for c, p in zip(counts, model.roi_heads.box_predictor):
            self.assertTrue(torch.equal(c, p.cls_loss.class_counts))


class TestConfigUpgrade(unittest.TestCase):
    def test_saved_config_with_old_keys_converts(self):
        import yaml

        from fasa_seesaw.config_upgrade import main as upgrade

        old = {
            "MODEL": {
                "ROI_HEADS": {"NAME": "SeesawROIHeads"},
                "SEESAW": {"P": 0.5, "NORMED_CLASSIFIER": True, "TEMPERATURE": 16.0},
                "NORMED_MASK_HEAD": {"TEMPERATURE": 12.0},
                "FASA": {"SYNC": False, "ADAPT": {"UP": 1.3, "DOWN": 0.7}},
            },
            "FASA_SEESAW": {"EVAL": {"ENGINE": "lvis", "FIXED_K": 77}},
        }
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = os.path.join(tmp, "old.yaml"), os.path.join(tmp, "new.yaml")
            with open(src, "w") as f:
                yaml.safe_dump(old, f)
            cfg = get_cfg()
            add_fasa_seesaw_config(cfg)
            with self.assertRaisesRegex(ConfigError, "config_upgrade"):
                merge_config(cfg, src)
            self.assertEqual(upgrade([src, dst]), 0)
            self.assertEqual(upgrade([src, dst]), 1)  # never overwrites
            cfg = get_cfg()
            add_fasa_seesaw_config(cfg)
            merge_config(cfg, dst)
        # Each renamed key's value is checked in test_fasa_diagnostics; here, the file round trip.
        self.assertEqual(cfg.MODEL.SEESAW.P, 0.5)
        self.assertEqual(cfg.MODEL.ROI_BOX_HEAD.NORM_TEMP, 16.0)
        self.assertEqual(cfg.TEST.LVIS.FIXED_K, 77)

    def test_seesaw_head_with_linear_classifier_keeps_it(self):
        """An old Seesaw-head config with the linear classifier upgrades to LongTailROIHeads with
        CLS_LOSS seesaw and NORMED_CLASSIFIER False: the same model, not a silent cosine one."""
        from fasa_seesaw.config import upgrade_config_dict

        for head, twin in (
            ("SeesawROIHeads", "LongTailROIHeads"),
            ("SeesawCascadeROIHeads", "LongTailCascadeROIHeads"),
        ):
            for normed in (False, True):
                old = {
                    "MODEL": {
                        "ROI_HEADS": {"NAME": head},
                        "SEESAW": {"NORMED_CLASSIFIER": normed},
                    }
                }
                new = upgrade_config_dict(old)
                cfg = get_cfg()
                add_fasa_seesaw_config(cfg)
                cfg.merge_from_other_cfg(type(cfg)(new))
                self.assertEqual(cfg.MODEL.ROI_HEADS.NAME, twin if not normed else head)
                self.assertEqual(resolve_cls_loss(cfg), "seesaw")
                self.assertEqual(cfg.MODEL.ROI_BOX_HEAD.NORMED_CLASSIFIER, normed)


if __name__ == "__main__":
    unittest.main()
