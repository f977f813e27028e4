# Copyright (c) fasa_seesaw contributors.
import io
import os
import tempfile
import unittest
import pytest
import torch
import torch.distributed as dist

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from fasa_seesaw import ConfigError, add_fasa_seesaw_config
from fasa_seesaw.modeling import (
    LongTailFastRCNNOutputLayers,
    NormedConv2d,
    NormedLinear,
    SeesawFastRCNNOutputLayers,
    SeesawLoss,
)
from fasa_seesaw.testing import spawn_gloo

NUM_CLASSES = 6
# Keyword arguments of SeesawLoss; the rest go to the predictor.
LOSS_KWARGS = ("p", "q", "eps", "objectness_loss_weight", "sync_counts")


def make_predictor(**kwargs):
    """The Seesaw predictor; the cosine classifier by default, as in the Seesaw recipe."""
    torch.manual_seed(0)
    loss_kwargs = {k: kwargs.pop(k) for k in LOSS_KWARGS if k in kwargs}
    kwargs.setdefault("normed_classifier", True)
    return SeesawFastRCNNOutputLayers(
        ShapeSpec(channels=16),
        box2box_transform=Box2BoxTransform(weights=(10, 10, 5, 5)),
        num_classes=NUM_CLASSES,
        cls_loss=SeesawLoss(NUM_CLASSES, **loss_kwargs),
        **kwargs,
    )


def seesaw_cfg(**box_head):
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.ROI_BOX_HEAD.NORMED_CLASSIFIER = True
    for key, value in box_head.items():
        cfg.MODEL.ROI_BOX_HEAD[key] = value
    return cfg


def make_proposals(gt_classes_per_image, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for gt in gt_classes_per_image:
        n = len(gt)
        xy = torch.rand(n, 2, generator=g) * 50
        boxes = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 20], dim=1)
        inst = Instances((100, 100))
        inst.proposal_boxes = Boxes(boxes)
        inst.gt_boxes = Boxes(boxes + 1.0)
        inst.gt_classes = torch.tensor(gt, dtype=torch.long)
        out.append(inst)
    return out


def expected_counts(gt_classes_per_image):
    counts = [0] * NUM_CLASSES
    for gt in gt_classes_per_image:
        for c in gt:
            if c < NUM_CLASSES:
                counts[c] += 1
    return counts


class TestSeesawPredictor(unittest.TestCase):
    def test_forward_shapes_and_probs(self):
        pred = make_predictor()
        self.assertIsInstance(pred.cls_score, NormedLinear)
        self.assertEqual(pred.cls_score.out_features, NUM_CLASSES + 2)
        x = torch.randn(5, 16)
        scores, deltas = pred(x)
        self.assertEqual(scores.shape, (5, NUM_CLASSES + 2))
        props = make_proposals([[0, 1, 6], [2, 6]])
        probs = pred.predict_probs((scores, deltas), props)
        self.assertEqual([p.shape for p in probs], [(3, NUM_CLASSES + 1), (2, NUM_CLASSES + 1)])
        allp = torch.cat(probs)
        torch.testing.assert_close(allp.sum(1), torch.ones(5))
        cls = torch.softmax(scores[:, :NUM_CLASSES], 1)
        obj = torch.softmax(scores[:, NUM_CLASSES:], 1)
        torch.testing.assert_close(allp[:, :NUM_CLASSES], cls * obj[:, :1])
        # detectron2's inference runs unchanged on these scores
        instances, _ = pred.inference((scores, deltas), props)
        self.assertEqual(len(instances), 2)

    def test_losses_counts_and_logging(self):
        pred = make_predictor()
        gts = [[0, 0, 3, 6, 6], [5, 6, 6, 6]]
        props = make_proposals(gts)
        x = torch.randn(9, 16)
        with EventStorage() as storage:
            losses = pred.losses(pred(x), props)
            losses = pred.losses(pred(x), props)
            latest = storage.latest()
        self.assertEqual(set(losses), {"loss_cls", "loss_cls_objectness", "loss_box_reg"})
        self.assertEqual(pred.cls_loss.class_counts.tolist(), [2 * c for c in expected_counts(gts)])
        self.assertIn("fast_rcnn/objectness_accuracy", latest)
        self.assertIn("fast_rcnn/fg_cls_accuracy", latest)
        sum(losses.values()).backward()

    def test_empty_and_background_batches(self):
        pred = make_predictor()
        with EventStorage():
            empty = pred.losses(pred(torch.zeros(0, 16)), [])
            self.assertTrue(all(v.item() == 0 for v in empty.values()))
            bg = pred.losses(pred(torch.randn(3, 16)), make_proposals([[6, 6, 6]]))
        self.assertEqual(bg["loss_cls"].item(), 0.0)
        self.assertGreater(bg["loss_cls_objectness"].item(), 0.0)
        self.assertEqual(pred.cls_loss.class_counts.sum().item(), 0)

    def test_counts_survive_checkpoint(self):
        pred = make_predictor()
        with EventStorage():
            pred.losses(pred(torch.randn(4, 16)), make_proposals([[1, 2, 2, 6]]))
        model = torch.nn.Sequential(pred)
        with tempfile.TemporaryDirectory() as d:
            DetectionCheckpointer(model, save_dir=d).save("ckpt")
            fresh = torch.nn.Sequential(make_predictor())
            self.assertEqual(fresh[0].cls_loss.class_counts.sum().item(), 0)
            DetectionCheckpointer(fresh).load(os.path.join(d, "ckpt.pth"))
        self.assertEqual(fresh[0].cls_loss.class_counts.tolist(), [0, 1, 2, 0, 0, 0])
        self.assertIn("0.cls_loss.class_counts", model.state_dict())

    def test_plain_classifier_option(self):
        pred = make_predictor(normed_classifier=False)
        self.assertNotIsInstance(pred.cls_score, NormedLinear)
        self.assertEqual(pred.cls_score.out_features, NUM_CLASSES + 2)

    def test_built_from_config(self):
        for cls, cls_loss in (
            (SeesawFastRCNNOutputLayers, "auto"),
            (LongTailFastRCNNOutputLayers, "seesaw"),
        ):
            pred = cls(seesaw_cfg(CLS_LOSS=cls_loss), ShapeSpec(channels=16))
            self.assertIsInstance(pred.cls_loss, SeesawLoss)
            self.assertIsInstance(pred.cls_score, NormedLinear)
            self.assertEqual(pred.cls_score.out_features, NUM_CLASSES + 2)

    def test_rejects_sigmoid_and_fed_loss(self):
        # Seesaw is a softmax loss: the flags of detectron2's sigmoid / federated loss contradict
        # it, whether the loss comes from the predictor's default or from CLS_LOSS.
        for flags, key in (
            ({"USE_SIGMOID_CE": True}, "USE_SIGMOID_CE"),
            ({"USE_FED_LOSS": True, "USE_SIGMOID_CE": True}, "USE_FED_LOSS"),
            ({"USE_FED_LOSS": True}, "USE_FED_LOSS"),
        ):
            for cls, cls_loss in (
                (SeesawFastRCNNOutputLayers, "auto"),
                (LongTailFastRCNNOutputLayers, "seesaw"),
            ):
                with self.subTest(flags=flags, cls=cls.__name__):
                    cfg = seesaw_cfg(CLS_LOSS=cls_loss, **flags)
                    with self.assertRaisesRegex(ConfigError, key):
                        cls(cfg, ShapeSpec(channels=16))
        with self.assertRaisesRegex(ConfigError, "p=-1"):
            make_predictor(p=-1.0)
        cfg = seesaw_cfg(CLS_LOSS="seesaw")
        cfg.MODEL.SEESAW.P = -1.0
        with self.assertRaisesRegex(ConfigError, "p=-1"):
            LongTailFastRCNNOutputLayers(cfg, ShapeSpec(channels=16))


class TestNormedLayers(unittest.TestCase):
    def test_normed_linear_is_scaled_cosine(self):
        layer = NormedLinear(8, 3, temperature=20.0)
        torch.nn.init.normal_(layer.bias)
        x = torch.randn(4, 8)
        w = layer.weight.detach()
        cos = torch.stack(
            [torch.stack([torch.dot(xi, wk) / (xi.norm() * wk.norm()) for wk in w]) for xi in x]
        )
        torch.testing.assert_close(layer(x), 20.0 * cos + layer.bias, rtol=1e-4, atol=1e-4)
        # invariant to the scale of the input
        torch.testing.assert_close(layer(x * 7.0), layer(x), rtol=1e-4, atol=1e-4)

    def test_normed_conv_1x1(self):
        conv = NormedConv2d(8, 3, kernel_size=1, temperature=20.0)
        x = torch.randn(2, 8, 5, 5)
        out = conv(x)
        xv = x.permute(0, 2, 3, 1)
        w = conv.weight.detach()[:, :, 0, 0]
        cos = (xv / xv.norm(dim=-1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).t()
        ref = 20.0 * cos.permute(0, 3, 1, 2) + conv.bias.view(1, 3, 1, 1)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


SHARDS = [[[0, 0, 1, 6], [2, 6, 6]], [[0, 5, 5, 6], [6, 1]]]


def _worker(rank, world_size, init_file, sync, out_file):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        pred = make_predictor(sync_counts=sync)
        props = make_proposals(SHARDS[rank], seed=rank)
        n = sum(len(p) for p in props)
        with EventStorage():
            for _ in range(2):
                pred.losses(pred(torch.randn(n, 16)), props)
        buf = io.BytesIO()
        torch.save(pred.cls_loss.class_counts, buf)
        with open(f"{out_file}.{rank}", "wb") as f:
            f.write(buf.getvalue())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # several processes
class TestDistributedCounts(unittest.TestCase):
    def _run(self, sync):
        with tempfile.TemporaryDirectory() as d:
            init_file, out = os.path.join(d, "init"), os.path.join(d, "counts")
            spawn_gloo(_worker, (2, init_file, sync, out), 2, init_file)
            return [torch.load(f"{out}.{r}") for r in range(2)]

    def test_two_processes_sum_to_single_process(self):
        counts = self._run(sync=True)
        single = make_predictor()
        union = SHARDS[0] + SHARDS[1]
        props = make_proposals(union)
        with EventStorage():
            for _ in range(2):
                single.losses(single(torch.randn(sum(len(p) for p in props), 16)), props)
        for c in counts:
            self.assertEqual(c.tolist(), single.cls_loss.class_counts.tolist())
        self.assertEqual(
            single.cls_loss.class_counts.tolist(), [2 * c for c in expected_counts(union)]
        )

    def test_per_process_counts_when_not_synced(self):
        counts = self._run(sync=False)
        for rank in range(2):
            self.assertEqual(counts[rank].tolist(), [2 * c for c in expected_counts(SHARDS[rank])])


if __name__ == "__main__":
    unittest.main()
