# Copyright (c) fasa_seesaw contributors.
"""
tools/convert_mmdet_checkpoint.py on state dicts laid out as mmdetection's
(fasa_seesaw.modelzoo.layout: the real key names and shapes, LVIS v1's 1203 classes, random
values), without mmdetection:

- every tensor of the checkpoint lands in exactly one tensor of the model, unchanged (the values
  are random, so each is found by value), and a hand-written sample of the key pairs, from the
  two frameworks' module names, holds;
- Seesaw's float C + 1 cum_samples become int64 class counts without background; the FASA
  release's bank and probabilities become the FASA module's state;
- the class order is checked against LVIS v1 (mmdetection's one corrected spelling allowed);
- each mismatch between checkpoint and config is one message naming the keys.
"""

import contextlib
import io
import os
import tempfile
import unittest
import pytest
import torch

from detectron2.data import MetadataCatalog

from fasa_seesaw.modelzoo import (
    ConversionError,
    check_class_order,
    convert_state_dict,
    lvis_v1_names,
)
from fasa_seesaw.modelzoo.layout import cascade_mask_rcnn_state, checkpoint, mask_rcnn_state
from fasa_seesaw.testing import checkpoint_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZOO = os.path.join(ROOT, "configs/LVISv1-InstanceSegmentation/mmdet_converted")

# mmdetection key -> detectron2 key, from the two frameworks' module names.
PAIRS = {
    "backbone.conv1.weight": "backbone.bottom_up.stem.conv1.weight",
    "backbone.bn1.running_mean": "backbone.bottom_up.stem.conv1.norm.running_mean",
    "backbone.layer1.0.downsample.1.running_var": (
        "backbone.bottom_up.res2.0.shortcut.norm.running_var"
    ),
    "backbone.layer1.0.downsample.0.weight": "backbone.bottom_up.res2.0.shortcut.weight",
    "backbone.layer4.2.conv2.weight": "backbone.bottom_up.res5.2.conv2.weight",
    "backbone.layer3.5.bn3.bias": "backbone.bottom_up.res4.5.conv3.norm.bias",
    "neck.lateral_convs.3.conv.bias": "backbone.fpn_lateral5.bias",
    "neck.fpn_convs.0.conv.weight": "backbone.fpn_output2.weight",
    "rpn_head.rpn_conv.weight": "proposal_generator.rpn_head.conv.weight",
    "rpn_head.rpn_cls.weight": "proposal_generator.rpn_head.objectness_logits.weight",
    "rpn_head.rpn_reg.bias": "proposal_generator.rpn_head.anchor_deltas.bias",
}
MASK_RCNN_PAIRS = {
    "roi_head.bbox_head.shared_fcs.0.weight": "roi_heads.box_head.fc1.weight",
    "roi_head.bbox_head.shared_fcs.1.bias": "roi_heads.box_head.fc2.bias",
    "roi_head.bbox_head.fc_cls.weight": "roi_heads.box_predictor.cls_score.weight",
    "roi_head.bbox_head.fc_reg.bias": "roi_heads.box_predictor.bbox_pred.bias",
    "roi_head.mask_head.convs.3.conv.weight": "roi_heads.mask_head.mask_fcn4.weight",
    "roi_head.mask_head.upsample.weight": "roi_heads.mask_head.deconv.weight",
    "roi_head.mask_head.conv_logits.bias": "roi_heads.mask_head.predictor.bias",
}
CASCADE_PAIRS = {
    "roi_head.bbox_head.2.fc_reg.weight": "roi_heads.box_predictor.2.bbox_pred.weight",
    "roi_head.bbox_head.1.shared_fcs.0.weight": "roi_heads.box_head.1.fc1.weight",
    "roi_head.mask_head.1.conv_logits.bias": "roi_heads.mask_head.1.predictor.bias",
    "roi_head.mask_head.0.convs.0.conv.weight": "roi_heads.mask_head.0.mask_fcn1.weight",
}
DERIVED = ("num_batches_tracked", "cum_samples", "feature_used", "cum_loss_perclass_t1")


def lvis_names():
    """LVIS v1 category names (the json's "name"), in id order, from detectron2's table."""
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    return [c["name"] for c in sorted(LVIS_CATEGORIES, key=lambda c: c["id"])]


def mmdet_names():
    # mmdetection's LVISV1Dataset list: the json's names, with "stero" corrected.
    return [
        "speaker_(stereo_equipment)" if n == "speaker_(stero_equipment)" else n
        for n in lvis_names()
    ]


def convert(main, state, config, tmp, classes=None, extra=()):
    src, dst = os.path.join(tmp, "in.pth"), os.path.join(tmp, "out.pth")
    torch.save(checkpoint(state, classes or mmdet_names()), src)
    rc = main([src, dst, "--config", os.path.join(ZOO, config), *extra])
    return rc, (checkpoint_model(dst) if rc == 0 else None)


class ConverterCase(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def convert(self, *args, **kwargs):
        return convert(self.load_tool("convert_mmdet_checkpoint").main, *args, **kwargs)

    def assert_every_tensor_lands_once(self, state, out, pairs):
        by_value = {}
        for k, v in out.items():
            by_value.setdefault((tuple(v.shape), tuple(v.flatten()[:16].tolist())), []).append(k)
        for key, value in state.items():
            if key.endswith(DERIVED):
                continue
            hits = [
                k
                for k in by_value.get(
                    (tuple(value.shape), tuple(value.flatten()[:16].tolist())), []
                )
                if torch.equal(out[k], value)
            ]
            self.assertEqual(len(hits), 1, f"{key} found in {hits}")
        for mm, d2 in pairs.items():
            torch.testing.assert_close(out[d2], state[mm], rtol=0, atol=0, msg=f"{mm} -> {d2}")


@pytest.mark.slow
class TestConvertWholeModels(ConverterCase):
    def test_seesaw_mask_rcnn_with_normed_mask(self):
        state = mask_rcnn_state(depth=50, seesaw=True)
        rc, out = self.convert(
            state, "mask_rcnn_R_50_FPN_2x_seesaw_normed_mask_random_mmdet.yaml", self.tmp.name
        )
        self.assertEqual(rc, 0)
        self.assert_every_tensor_lands_once(state, out, {**PAIRS, **MASK_RCNN_PAIRS})
        counts = out["roi_heads.box_predictor.cls_loss.class_counts"]
        self.assertEqual(counts.dtype, torch.int64)
        self.assertEqual(
            counts.tolist(), state["roi_head.bbox_head.loss_cls.cum_samples"][:1203].long().tolist()
        )
        self.assertEqual(len(out), len([k for k in state if "num_batches_tracked" not in k]))

    def test_seesaw_cascade_with_a_mask_head_per_stage(self):
        state = cascade_mask_rcnn_state(depth=101, seesaw=True)
        rc, out = self.convert(
            state, "cascade_mask_rcnn_R_101_FPN_2x_seesaw_random_mmdet.yaml", self.tmp.name
        )
        self.assertEqual(rc, 0)
        self.assert_every_tensor_lands_once(state, out, {**PAIRS, **CASCADE_PAIRS})
        for k in range(3):
            self.assertEqual(out[f"roi_heads.box_predictor.{k}.bbox_pred.weight"].shape, (4, 1024))

    def test_fasa_release(self):
        state = mask_rcnn_state(depth=50, seesaw=False, fasa=True)
        rc, out = self.convert(
            state, "mask_rcnn_R_50_FPN_2x_fasa_random_fasa_release.yaml", self.tmp.name
        )
        self.assertEqual(rc, 0)
        self.assert_every_tensor_lands_once(state, out, {**PAIRS, **MASK_RCNN_PAIRS})
        p = "roi_heads.box_predictor.fasa."
        # feature_std holds the variance (the release's generator takes its square root)
        torch.testing.assert_close(out[p + "bank.var"], state["roi_head.bbox_head.feature_std"])
        torch.testing.assert_close(out[p + "probs"], state["roi_head.bbox_head.prob_list"])
        self.assertEqual(
            out[p + "bank.count"].tolist(), state["roi_head.bbox_head.feature_used"].long().tolist()
        )
        self.assertTrue(bool(out[p + "probs_initialized"]))
        self.assertEqual(out["roi_heads.box_predictor.cls_score.weight"].shape, (1204, 1024))


@pytest.mark.slow
class TestConvertRefuses(ConverterCase):
    def _refused(self, state, config, pattern, classes=None, extra=()):
        with _stderr() as err:
            rc, _ = self.convert(state, config, self.tmp.name, classes=classes, extra=extra)
        self.assertEqual(rc, 1)
        self.assertRegex(err.getvalue(), pattern)
        self.assertNotIn("Traceback", err.getvalue())
        self.assertFalse(os.path.exists(os.path.join(self.tmp.name, "out.pth")))

    @classmethod
    def model_state(cls, config, *opts):
        from detectron2.config import get_cfg
        from detectron2.modeling import build_model

        from fasa_seesaw import add_fasa_seesaw_config
        from fasa_seesaw.config import merge_config

        cfg = get_cfg()
        add_fasa_seesaw_config(cfg)
        merge_config(cfg, os.path.join(ZOO, config), ["MODEL.DEVICE", "cpu", *opts])
        return build_model(cfg).state_dict()

    def test_cascade_into_one_mask_head(self):
        one_head = self.model_state(
            "../cascade_mask_rcnn_R_50_FPN_2x_seesaw_random_lvis_v1.yaml",
            "MODEL.ROI_BOX_CASCADE_HEAD.MASK_HEADS",
            "one",
        )
        with self.assertRaisesRegex(
            ConversionError,
            r"(?s)36 checkpoint keys map to nothing.*MASK_HEADS one.*"
            r"roi_head\.mask_head\.0\.convs\.0\.conv\.weight -> roi_heads\.mask_head\.0\.mask_fcn1",
        ):
            convert_state_dict(cascade_mask_rcnn_state(depth=50), one_head)

    def test_unknown_keys_wrong_shapes_missing_parts(self):
        model = self.model_state("mask_rcnn_R_50_FPN_2x_seesaw_random_mmdet.yaml")
        state = mask_rcnn_state(depth=50, seesaw=True)
        state["roi_head.semantic_head.conv_embedding.weight"] = torch.zeros(3)
        with self.assertRaisesRegex(
            ConversionError, r"(?s)1 checkpoint keys have no rule.*semantic branch.*semantic_head"
        ):
            convert_state_dict(state, model)
        with self.assertRaisesRegex(
            ConversionError, r"(?s)another shape.*fc_cls\.weight \(1204, 1024\) -> .*\(1205, 1024\)"
        ):
            convert_state_dict(mask_rcnn_state(depth=50, seesaw=False), model)
        no_mask = {k: v for k, v in state.items() if "mask_head" not in k and "semantic" not in k}
        with self.assertRaisesRegex(
            ConversionError, r"(?s)model keys get no value.*roi_heads\.mask_head\."
        ):
            convert_state_dict(no_mask, model)

    def test_class_order(self):
        names = mmdet_names()
        names[3], names[7] = names[7], names[3]
        self._refused(
            mask_rcnn_state(depth=50),
            "mask_rcnn_R_50_FPN_2x_seesaw_random_mmdet.yaml",
            r"class order differs .* at 2 of 1203 outputs "
            r"\(output 3: checkpoint 'ambulance', dataset 'alarm_clock'",
            classes=names,
        )

    def test_missing_config_and_bad_overrides(self):
        main = self.load_tool("convert_mmdet_checkpoint").main
        out = os.path.join(self.tmp.name, "out.pth")
        for argv, pattern in (
            (["in.pth", out, "--config", "nope.yaml"], "'nope.yaml' \\(--config\\) does not exist"),
            (
                [
                    "in.pth",
                    out,
                    "--config",
                    os.path.join(ZOO, "mask_rcnn_R_50_FPN_2x_seesaw_random_mmdet.yaml"),
                    "MODEL.WEIGHTS",
                ],
                "could not be applied.*KEY VALUE pairs",
            ),
        ):
            with _stderr() as err:
                self.assertEqual(main(argv), 1)
            self.assertRegex(err.getvalue(), pattern)
            self.assertNotIn("Traceback", err.getvalue())

    def test_never_overwrites(self):
        dst = os.path.join(self.tmp.name, "out.pth")
        with open(dst, "w") as f:
            f.write("mine")
        main = self.load_tool("convert_mmdet_checkpoint").main
        with _stderr() as err:
            rc = main(
                [
                    "whatever.pth",
                    dst,
                    "--config",
                    os.path.join(ZOO, "mask_rcnn_R_50_FPN_2x_seesaw_random_mmdet.yaml"),
                ]
            )
        self.assertEqual(rc, 1)
        self.assertIn("never overwritten", err.getvalue())
        with open(dst) as f:
            self.assertEqual(f.read(), "mine")


class TestClassOrder(unittest.TestCase):
    def test_lvis_names_and_the_one_spelling(self):
        check_class_order(mmdet_names(), lvis_names())
        check_class_order(lvis_names(), lvis_names())
        # detectron2 names its LVIS classes by their first synonym ("horned_cow" for "bull"):
        # a category matches by its name or any synonym
        d2 = list(MetadataCatalog.get("lvis_v1_val").thing_classes)
        self.assertNotEqual(d2, lvis_names())
        check_class_order(mmdet_names(), lvis_v1_names())
        check_class_order(d2, lvis_v1_names())
        with self.assertRaisesRegex(ConversionError, "at 1 of 1203"):
            check_class_order(mmdet_names(), d2)
        with self.assertRaisesRegex(ConversionError, "1202 classes, the dataset has 1203"):
            check_class_order(lvis_names()[:-1], lvis_names())
        wrong = lvis_names()
        wrong[0] = "aerosol"
        with self.assertRaisesRegex(ConversionError, "at 1 of 1203 outputs"):
            check_class_order(wrong, lvis_names())


@contextlib.contextmanager
def _stderr():
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        yield buf


if __name__ == "__main__":
    unittest.main()
