# Copyright (c) fasa_seesaw contributors.
"""
Every key the project adds to the config has a domain, checked before anything is built: a
table of values each key must refuse and values it must accept, written here from the methods'
definitions (not read from the code under test), over all keys.
"""

import unittest

from detectron2.config import get_cfg

from fasa_seesaw import ConfigError, add_fasa_seesaw_config
from fasa_seesaw.engine import check_config
from fasa_seesaw.engine.settings import SETTINGS, check_settings, project_keys

NAN, INF = float("nan"), float("inf")
BOOL_BAD = [1, 0, "True", None]

# key: (values refused, values accepted). Every project key has a row.
CASES = {
    "MODEL.ROI_BOX_HEAD.CLS_LOSS": (
        ["focal", "", "Seesaw", "EQL", "eqlv3"], ["auto", "seesaw", "softmax_ce", "eql", "eqlv2"]
    ),
    "MODEL.ROI_BOX_HEAD.NORMED_CLASSIFIER": (BOOL_BAD, [True, False]),
    "MODEL.ROI_BOX_HEAD.NORM_TEMP": ([0.0, -20.0, NAN, INF], [20.0, 0.5]),
    "MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED": (BOOL_BAD, [True, False]),
    "MODEL.ROI_MASK_HEAD.NORM_TEMP": ([0.0, -1.0, NAN], [20.0, 1.0]),
    "MODEL.ROI_BOX_CASCADE_HEAD.SCORE_AVERAGE": (["mean", "Logits"], ["probs", "logits"]),
    "MODEL.ROI_BOX_CASCADE_HEAD.MASK_HEADS": (["each", 3, "first"], ["one", "per_stage", "last"]),
    # HTC-Lite's context encoder: pyramid levels by name, at least one; a loss weight >= 0.
    "MODEL.GLOBAL_CONTEXT.ENABLED": (BOOL_BAD, [True, False]),
    "MODEL.GLOBAL_CONTEXT.IN_FEATURES": (
        [[], "p6", ["p6", "p6"], [""], [6]], [["p6"], ["p5", "p6"], ("p6",)]
    ),
    "MODEL.GLOBAL_CONTEXT.NUM_CONVS": ([-1, 2.0, NAN, True], [0, 4]),
    "MODEL.GLOBAL_CONTEXT.CONV_DIM": ([0, -256, 256.0], [1, 256]),
    "MODEL.GLOBAL_CONTEXT.RESIDUAL": (BOOL_BAD, [True, False]),
    "MODEL.GLOBAL_CONTEXT.NORM": ([None, 1, "gn", "batchnorm"], ["", "GN", "SyncBN", "BN"]),
    "MODEL.GLOBAL_CONTEXT.LOSS_WEIGHT": ([-1.0, -0.01, NAN, INF], [0.0, 3.0]),
    "MODEL.GLOBAL_CONTEXT.TARGET": (["lvis", "Federated", ""], ["federated", "exhaustive"]),
    "MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS": (
        [[-1.0, 0.5, 0.25], [NAN], 1.0, ["1"]], [[], [1.0, 0.5, 0.25], (1, 1, 1)]
    ),
    "INPUT.RESIZE_BACKEND": (["opencv", "PIL", ""], ["pil", "cv2"]),
    "MODEL.RPN.NMS_RESAMPLING.ENABLED": (BOOL_BAD, [True, False]),
    "MODEL.RPN.NMS_RESAMPLING.MODE": (["linear", "Discrete"], ["discrete", "matched"]),
    # IoU thresholds of rare, common, frequent: each in (0, 1].
    "MODEL.RPN.NMS_RESAMPLING.THRESHOLDS": (
        [[0.9, 0.8], [0.9, 0.8, 0.0], [1.1, 0.8, 0.7], [NAN, 0.8, 0.7], 0.9],
        [[0.9, 0.8, 0.7], (1.0, 1.0, 1.0), [0.5, 0.6, 0.7]],
    ),
    "MODEL.RPN.NMS_RESAMPLING.MATCH_IOU": ([-0.1, 1.5, NAN], [0.0, 0.3, 1.0]),
    "MODEL.SEESAW.P": ([-0.8, NAN, INF, True], [0.0, 0.8, 2]),
    "MODEL.SEESAW.Q": ([-2.0, NAN, INF], [0.0, 2.0]),
    "MODEL.SEESAW.EPS": ([0.0, -0.01, 1.5, NAN], [0.01, 1.0]),
    "MODEL.SEESAW.LOSS_WEIGHT": ([-1.0, NAN, INF], [0.0, 1.0]),
    "MODEL.SEESAW.OBJECTNESS_LOSS_WEIGHT": ([-0.5, NAN], [0.0, 1.0]),
    "MODEL.SEESAW.SYNC_COUNTS": (BOOL_BAD, [True, False]),
    # EQL: lambda is a frequency threshold (0 = no tail class); a prior probability lies in (0, 1).
    "MODEL.EQL.LAMBDA": ([-0.001, NAN, INF, True], [0.0, 0.0011, 0.00177]),
    "MODEL.EQL.LOSS_WEIGHT": ([-1.0, NAN], [0.0, 1.0]),
    "MODEL.EQL.PRIOR_PROB": ([0.0, 1.0, -0.1, NAN], [0.001, 0.5]),
    "MODEL.EQLV2.GAMMA": ([-12.0, NAN, INF], [0.0, 12.0]),
    "MODEL.EQLV2.MU": ([-0.8, NAN], [0.0, 0.8]),
    "MODEL.EQLV2.ALPHA": ([-4.0, NAN], [0.0, 4.0]),
    "MODEL.EQLV2.LOSS_WEIGHT": ([-1.0, NAN], [0.0, 1.0]),
    "MODEL.EQLV2.PRIOR_PROB": ([0.0, 1.0, NAN], [0.001, 0.99]),
    "MODEL.EQLV2.TEST_WITH_OBJ": (BOOL_BAD, [True, False]),
    "MODEL.EQLV2.SYNC_STATS": (BOOL_BAD, [True, False]),
    "MODEL.FASA.ENABLED": (BOOL_BAD, [True, False]),
    "MODEL.FASA.LOSS_WEIGHT": ([-0.1, NAN], [0.0, 0.1]),
    "MODEL.FASA.SAMPLES_PER_CLASS": ([0, -1, 1.5, True], [1, 5]),
    "MODEL.FASA.CLAMP_MIN_ZERO": (BOOL_BAD, [True, False]),
    "MODEL.FASA.WARMUP_ITERS": ([-2, 1.0, "epoch"], [-1, 0, 100]),
    "MODEL.FASA.BANK_MODE": (["median", "EMA"], ["ema", "exact"]),
    "MODEL.FASA.BANK_MOMENTUM": ([0.0, -0.1, 1.1, NAN], [0.1, 1.0]),
    "MODEL.FASA.BANK_VARIANCE": (["unbiased"], ["sample", "population"]),
    "MODEL.FASA.SYNC_BANK": (BOOL_BAD, [True, False]),
    "MODEL.FASA.INIT_PROBS": (["inverse", "sqrt"], ["inverse_frequency", "uniform"]),
    "MODEL.FASA.AUGMENTATION": (["SMOTE", "mixup", ""], ["gaussian", "smote", "moex"]),
    "MODEL.FASA.FEATURE_MEMORY": ([0, -1, 8.0, True], [1, 2, 16]),
    # SMOTE's k nearest neighbours: k >= 1.
    "MODEL.FASA.SMOTE_K": ([0, -5, 5.0], [1, 5]),
    # MoEx's lambda weighs the drawn class's label: (0, 1].
    "MODEL.FASA.MOEX_LAMBDA": ([0.0, -0.1, 1.5, NAN], [0.9, 1.0, 0.5]),
    "MODEL.FASA.MOEX_PROB": ([-0.1, 1.1, NAN], [0.0, 1.0, 0.5]),
    "MODEL.FASA.MOEX_EPS": ([0.0, -1e-5, NAN, INF], [1e-5, 1.0]),
    "MODEL.FASA.ADAPT.ENABLED": (BOOL_BAD, [True, False]),
    "MODEL.FASA.ADAPT.PERIOD": ([0, -2, 10.0], [-1, 1, 500]),
    "MODEL.FASA.ADAPT.HELDOUT_DATASET": ([None, 3], ["", "lvis_v1_val"]),
    "MODEL.FASA.ADAPT.AUGMENT": (BOOL_BAD, [True, False]),
    "MODEL.FASA.ADAPT.HELDOUT_FRACTION": ([0.0, 1.0, -0.1, 1.5, NAN], [0.1, 0.5]),
    "MODEL.FASA.ADAPT.SEED": ([-1, 2**32, 0.5, True], [0, 7, 2**32 - 1]),
    "MODEL.FASA.ADAPT.CLUSTERING": (["kmeans", "MeanShift"], ["meanshift", "none", "affinity"]),
    "MODEL.FASA.ADAPT.BANDWIDTH": ([-0.1, NAN, INF], [0.0, 0.5]),
    "MODEL.FASA.ADAPT.BANDWIDTH_QUANTILE": ([0.0, -0.05, 1.01, NAN], [0.05, 1.0]),
    "MODEL.FASA.ADAPT.AFFINITY_DAMPING": ([0.49, 1.0, NAN], [0.5, 0.9]),
    "MODEL.FASA.ADAPT.GROUP_SIGNAL": (["sum"], ["reference", "mean_per_roi"]),
    "MODEL.FASA.ADAPT.SIGNAL": (["accuracy", "ap"], ["loss", "metric"]),
    # p *= UP for a group whose loss fell, *= DOWN for one whose loss rose: UP > 1 > DOWN > 0.
    "MODEL.FASA.ADAPT.UP_FACTOR": ([-1.0, 0.5, 1.0, NAN], [1.1, 2.0]),
    "MODEL.FASA.ADAPT.DOWN_FACTOR": ([2.0, 1.0, 0.0, -0.9, NAN], [0.9, 0.5]),
    "TEST.LVIS.ENGINE": (["fast", "coco"], ["hotcoco", "lvis"]),
    "TEST.LVIS.EXTRAS": (
        [["fixed", "tidy"], ["tide", "tide"], "tide"], [[], ["tide"], ("fixed", "pool")]
    ),
    "TEST.LVIS.FIXED_K": ([0, -10000], [1, 10000]),
    "TEST.LVIS.TOPK_PER_CLASS": ([-1, 5.0], [0, 10000]),
    "TEST.LVIS.TOPK_MAX_PER_IMAGE": ([0, -2], [-1, 1, 1000]),
    "TEST.LVIS.FIGURES": (BOOL_BAD, [True, False]),
    "FASA_SEESAW.PROGRESS_PERIOD": ([-1, 2.5], [0, 20]),
    "FASA_SEESAW.CHECK_NUM_CLASSES": (BOOL_BAD, [True, False]),
    "FASA_SEESAW.HOLD_OUT_FASA_SPLIT": (BOOL_BAD, [True, False]),
    "FASA_SEESAW.GRAD_STATS.ENABLED": (BOOL_BAD, [True, False]),
}  # fmt: skip


def _cfg():
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    return cfg


def _set(cfg, key, value):
    *parents, leaf = key.split(".")
    node = cfg
    for name in parents:
        node = node[name]
    node[leaf] = value


class TestSettings(unittest.TestCase):
    def test_every_key_has_a_domain_and_a_row_here(self):
        keys = set(project_keys())
        self.assertGreater(len(keys), 40)
        self.assertEqual(set(SETTINGS), keys, "keys without a domain, or domains of no key")
        self.assertEqual(set(CASES), keys, "keys this test does not cover")

    def test_defaults_are_accepted(self):
        check_settings(_cfg())

    def test_each_bad_value_is_refused_with_the_key_and_the_value(self):
        for key, (bad, good) in CASES.items():
            for value in bad:
                with self.subTest(key=key, value=value):
                    cfg = _cfg()
                    _set(cfg, key, value)
                    with self.assertRaises(ConfigError) as cm:
                        check_settings(cfg)
                    msg = str(cm.exception)
                    self.assertTrue(msg.startswith(f"{key} is {value!r}; it must be "), msg)
            for value in good:
                with self.subTest(key=key, value=value):
                    cfg = _cfg()
                    _set(cfg, key, value)
                    if key == "TEST.LVIS.TOPK_PER_CLASS" and value:
                        cfg.TEST.LVIS.FIXED_K = value
                    check_settings(cfg)

    def test_the_first_problem_is_reported_by_itself(self):
        cfg = _cfg()
        cfg.MODEL.FASA.BANK_MODE = "median"
        cfg.MODEL.FASA.ADAPT.CLUSTERING = "kmeans"
        with self.assertRaises(ConfigError) as cm:
            check_settings(cfg)
        self.assertEqual(
            str(cm.exception),
            "MODEL.FASA.BANK_MODE is 'median'; it must be one of ['ema', 'exact'].",
        )

    def test_an_lr_step_at_max_iter(self):
        cfg = _cfg()
        cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 6, (4, 6)
        with self.assertRaisesRegex(ConfigError, r"SOLVER.STEPS \(4, 6\) has a step at"):
            check_config(cfg)

    def test_keys_that_must_agree(self):
        cfg = _cfg()
        cfg.TEST.LVIS.TOPK_PER_CLASS = 10  # below FIXED_K 10000
        with self.assertRaisesRegex(ConfigError, r"TOPK_PER_CLASS \(10\) is below FIXED_K"):
            check_settings(cfg)
        cfg = _cfg()
        cfg.MODEL.FASA.AUGMENTATION, cfg.MODEL.FASA.FEATURE_MEMORY = "smote", 1
        with self.assertRaisesRegex(ConfigError, r"FEATURE_MEMORY is 1; AUGMENTATION 'smote'"):
            check_settings(cfg)
        cfg.MODEL.FASA.AUGMENTATION = "moex"  # one stored feature is enough
        check_settings(cfg)

    def test_the_issues_settings_are_refused_by_check_config(self):
        # Settings that used to be accepted and then trained a wrong model, or crashed an epoch in.
        for key, value, words in (
            ("MODEL.FASA.ADAPT.UP_FACTOR", -1.0, "the paper uses 1.1"),
            ("MODEL.FASA.ADAPT.DOWN_FACTOR", 2.0, "the paper uses 0.9"),
            ("MODEL.FASA.ADAPT.PERIOD", 0, "set ADAPT.ENABLED False"),
            ("MODEL.ROI_BOX_HEAD.NORM_TEMP", 0.0, "a finite number > 0"),
            ("MODEL.FASA.ADAPT.SEED", -1, r"an integer in \[0, 4294967295\]"),
        ):
            with self.subTest(key=key):
                cfg = _cfg()
                _set(cfg, key, value)
                with self.assertRaisesRegex(ConfigError, words):
                    check_config(cfg)


if __name__ == "__main__":
    unittest.main()
