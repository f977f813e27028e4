# Copyright (c) fasa_seesaw contributors.
"""
tools/fasa_diagnostics.py: the adaptation-rule check recovers the (up, down) exponents of
probabilities produced by fasa_seesaw's own adapt_probabilities, and rejects ratios the rule
cannot produce (wrong counts); the virtual-feature statistics read metrics.json after warm-up.
"""

import copy
import json
import numpy as np
import os
import tempfile
import unittest
import yaml

from fasa_seesaw.modeling.fasa_sampling import adapt_probabilities, initial_probabilities

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Tool:
    @property
    def fd(self):
        return self.load_tool("fasa_diagnostics")  # tools/fasa_diagnostics.py (conftest.py)


class TestAdaptationExponents(_Tool, unittest.TestCase):
    def test_recovers_the_rule_and_rejects_wrong_counts(self):
        rng = np.random.default_rng(0)
        counts = rng.integers(1, 500, size=40)
        p0 = initial_probabilities(counts)
        groups = rng.integers(0, 5, size=40)
        p, prev, ups, downs = p0.copy(), None, np.zeros(40, int), np.zeros(40, int)
        passes = 4
        for _ in range(passes):
            loss = rng.normal(size=5)
            new = adapt_probabilities(p, groups, loss, prev)
            if prev is not None:  # independent bookkeeping of the rule, per group
                ups += (loss < prev)[groups]
                downs += (loss > prev)[groups]
            p, prev = new, loss
        p = p.astype(np.float32).astype(np.float64)  # the checkpoint buffer is float32
        exps = self.fd.adaptation_exponents(p / p0, passes)
        self.assertEqual(exps, [(int(a), int(b)) for a, b in zip(ups, downs)])
        # Probabilities from other counts (one class's count off by one) break the rule there.
        wrong = counts.copy()
        wrong[3] += 1
        exps = self.fd.adaptation_exponents(p / initial_probabilities(wrong), passes)
        self.assertGreater(sum(e is None for e in exps), 0)
        # More adaptation steps than passes allow are not accepted either.
        self.assertIsNone(self.fd.adaptation_exponents([1.1**3], passes=3)[0])
        self.assertEqual(self.fd.adaptation_exponents([1.1**2], passes=3)[0], (2, 0))

    def test_virtual_stats_after_warmup(self):
        with tempfile.TemporaryDirectory() as d:
            rows = [
                {"iteration": 19, "fasa/num_virtual": 0.0, "loss_fasa": 0.0},
                {"iteration": 39, "fasa/num_virtual": 2.0, "loss_fasa": 0.5},
                {"iteration": 59, "fasa/num_virtual": 4.0, "loss_fasa": 0.0},
                {"iteration": 60, "fasa/num_groups": 3.0},
            ]
            with open(os.path.join(d, "metrics.json"), "w") as f:
                f.write("\n".join(json.dumps(r) for r in rows) + "\n")
            s = self.fd.virtual_stats(d, warmup=20)
        self.assertEqual(s["virtual_per_step"], 3.0)
        self.assertEqual(s["virtual_samples"], 2)
        self.assertEqual(s["loss_fasa_nonzero"], 0.5)


def old_saved_config(head, **values):
    """A full config as train_net.py saved it before keys were renamed: RENAMED_KEYS' new keys
    under their old names (with ``values`` by old key), and no key that did not exist then."""
    from detectron2.config import get_cfg

    from fasa_seesaw import add_fasa_seesaw_config
    from fasa_seesaw.config import RENAMED_KEYS

    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    data = yaml.safe_load(cfg.dump())
    data["MODEL"]["ROI_HEADS"]["NAME"] = head
    del data["MODEL"]["ROI_BOX_HEAD"]["CLS_LOSS"]
    for old, new in RENAMED_KEYS.items():
        *parents, leaf = new.split(".")
        node = data
        for name in parents:
            node = node[name]
        value = node.pop(leaf)
        *parents, leaf = old.split(".")
        node = data
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = values.get(old, value)
    del data["TEST"]["LVIS"]
    return data


class TestOldSavedConfig(_Tool, unittest.TestCase):
    def merged(self, data):
        from detectron2.config import get_cfg

        from fasa_seesaw import add_fasa_seesaw_config

        cfg = get_cfg()
        add_fasa_seesaw_config(cfg)
        cfg.merge_from_other_cfg(type(cfg)(self.fd.upgrade_saved_config(data)))
        return cfg

    def test_renamed_keys_are_read_under_their_new_names(self):
        from fasa_seesaw.modeling import resolve_cls_loss

        values = {
            "MODEL.SEESAW.NORMED_CLASSIFIER": True,
            "MODEL.SEESAW.TEMPERATURE": 13.0,
            "MODEL.NORMED_MASK_HEAD.TEMPERATURE": 9.0,
            "MODEL.FASA.SYNC": False,
            "MODEL.FASA.ADAPT.UP": 1.3,
            "MODEL.FASA.ADAPT.DOWN": 0.7,
            "FASA_SEESAW.EVAL.ENGINE": "lvis",
            "FASA_SEESAW.EVAL.FIXED_K": 77,
        }
        data = old_saved_config("SeesawROIHeads", **values)
        before = copy.deepcopy(data)
        cfg = self.merged(data)
        self.assertEqual(data, before)  # the input is left alone
        self.assertTrue(cfg.MODEL.ROI_BOX_HEAD.NORMED_CLASSIFIER)
        self.assertEqual(cfg.MODEL.ROI_BOX_HEAD.NORM_TEMP, 13.0)
        self.assertEqual(cfg.MODEL.ROI_MASK_HEAD.NORM_TEMP, 9.0)
        self.assertFalse(cfg.MODEL.FASA.SYNC_BANK)
        self.assertEqual(
            (cfg.MODEL.FASA.ADAPT.UP_FACTOR, cfg.MODEL.FASA.ADAPT.DOWN_FACTOR), (1.3, 0.7)
        )
        self.assertEqual((cfg.TEST.LVIS.ENGINE, cfg.TEST.LVIS.FIXED_K), ("lvis", 77))
        self.assertEqual(resolve_cls_loss(cfg), "seesaw")
        # The cosine classifier was the Seesaw heads' alone: other heads never built it.
        data = old_saved_config("FASAROIHeads", **{"MODEL.SEESAW.NORMED_CLASSIFIER": True})
        cfg = self.merged(data)
        self.assertFalse(cfg.MODEL.ROI_BOX_HEAD.NORMED_CLASSIFIER)
        self.assertEqual(resolve_cls_loss(cfg), "softmax_ce")

    def test_unknown_keys_still_fail(self):
        data = old_saved_config("SeesawROIHeads")
        data["FASA_SEESAW"]["EVAL"]["NO_SUCH_KEY"] = 1
        with self.assertRaisesRegex(KeyError, "FASA_SEESAW.EVAL"):
            self.merged(data)


if __name__ == "__main__":
    unittest.main()
