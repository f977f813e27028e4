# Copyright (c) fasa_seesaw contributors.
"""
Golden behaviour: 5 single-threaded training iterations at a fixed seed for CE, Seesaw,
FASA + Seesaw and Cascade + Seesaw on the smoke dataset, then inference on two images. The
losses of every iteration, a digest of the final state dict and a digest of the inference
outputs must equal the values in tests/data/golden.json bit for bit; the state-dict layout
(keys, shapes, dtypes) must equal the recorded one, so checkpoints saved before a refactor load
with no missing or unexpected key.

The values were recorded with the code as it stood before the predictor/ROI-head refactor
(``FASA_SEESAW_RECORD_GOLDEN=1 python -m pytest tests/test_golden.py``); state-dict keys are
compared in the layout of that time (``MOVED``). Since then the CE family runs through
LongTailROIHeads instead of detectron2's StandardROIHeads, with the same numbers. Parameters are
re-initialised after the model is built, from a generator seeded by each parameter's name, and
the global generators are seeded again: so the numbers do not depend on how many random draws
building the model takes (the old ROI heads built the box predictor twice, the new ones once).
"""

import contextlib
import hashlib
import json
import numpy as np
import os
import random
import unittest
import zlib
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from fasa_seesaw import add_fasa_seesaw_config
from fasa_seesaw.data.datasets import prepare_datasets
from fasa_seesaw.testing import SMOKE_OPTS

pytestmark = pytest.mark.slow  # training, subprocesses or several processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "data", "golden.json")
QUICKSTART = os.path.join(ROOT, "configs", "quickstart")
SMOKE = SMOKE_OPTS + ["SOLVER.IMS_PER_BATCH", "2"]
FAMILIES = {
    "ce": ("mask_rcnn_R_18_FPN_ce_quickstart.yaml", []),
    "seesaw": ("mask_rcnn_R_18_FPN_seesaw_quickstart.yaml", []),
    "fasa_seesaw": (
        "mask_rcnn_R_18_FPN_fasa_seesaw_quickstart.yaml",
        ["MODEL.FASA.WARMUP_ITERS", "1", "MODEL.FASA.SAMPLES_PER_CLASS", "3"],
    ),
    "cascade_seesaw": ("cascade_mask_rcnn_R_18_FPN_seesaw_quickstart.yaml", []),
}
ITERS = 5
# Families whose trained box predictors are kept as files written by the recording code.
OLD_PREDICTOR_FILES = ("fasa_seesaw", "cascade_seesaw")


def golden_cfg(family):
    name, extra = FAMILIES[family]
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    cfg.merge_from_file(os.path.join(QUICKSTART, name))
    cfg.merge_from_list(SMOKE + extra)
    return cfg


def reinitialize(model):
    """Deterministic parameters that depend only on each parameter's name and shape."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            if p.dim() > 1:
                std = (1.0 / p[0].numel()) ** 0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        for name, b in in_old_layout(dict(model.named_buffers())).items():
            # FASA: draw every seen class at every step, so the draws are part of the record.
            if name.endswith("fasa_probs"):
                b.fill_(1.0)
            elif name.endswith("fasa_probs_initialized"):
                b.fill_(True)


def seed_all(seed=0):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def digest(tensors):
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# The loss and FASA state moved from the box predictor into its cls_loss and fasa modules; the
# recorded values use the names of before (this list is the test's own, not the code's).
MOVED = (
    (".cls_loss.class_counts", ".class_counts"),
    (".fasa.bank.", ".fasa_bank."),
    (".fasa.probs", ".fasa_probs"),
)


def old_name(key):
    for new, old in MOVED:
        key = key.replace(new, old)
    return key


def in_old_layout(state_dict):
    return {old_name(k): v for k, v in state_dict.items()}


def layout_of(state_dict):
    return {k: [list(v.shape), str(v.dtype)] for k, v in in_old_layout(state_dict).items()}


def inference_outputs(model, cfg):
    mapper = DatasetMapper(cfg, is_train=False)
    inputs = [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TEST[0])[:2]]
    model.eval()
    with torch.no_grad():
        outputs = model(inputs)
    tensors = []
    for i, out in enumerate(outputs):
        inst = out["instances"]
        for field in ("pred_boxes", "scores", "pred_classes", "pred_masks"):
            value = inst.get(field)
            value = value.tensor if field == "pred_boxes" else value
            tensors.append((f"{i}.{field}", value))
    return tensors


def predictors(model):
    p = model.roi_heads.box_predictor
    if isinstance(p, torch.nn.ModuleList):  # cascade stages
        return {f"box_predictor.{i}": stage for i, stage in enumerate(p)}
    return {"box_predictor": p}


def predictor_outputs(model):
    """Scores, deltas and test-time probabilities of each box predictor on fixed features."""
    tensors = []
    g = torch.Generator().manual_seed(7)
    for name, p in sorted(predictors(model).items()):
        p.eval()
        x = torch.rand(6, p.cls_score.in_features, generator=g)
        with torch.no_grad():
            scores, deltas = p(x)
            probs = p.predict_probs((scores, deltas), [range(6)])[0]
        tensors += [
            (f"{name}.scores", scores),
            (f"{name}.deltas", deltas),
            (f"{name}.probs", probs),
        ]
    return tensors


def predictor_file(family):
    return os.path.join(ROOT, "tests", "data", f"golden_{family}_predictors.pt")


@contextlib.contextmanager
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_family(family):
    """Builds, trains ITERS iterations and runs inference; returns (record, model, cfg)."""
    with single_thread():
        cfg = golden_cfg(family)
        prepare_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
        torch.manual_seed(0)
        model = build_model(cfg)
        reinitialize(model)
        seed_all(0)
        mapper = DatasetMapper(cfg, is_train=True)
        dicts = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
        batches = [[mapper(d) for d in dicts[2 * i : 2 * i + 2]] for i in range(ITERS)]
        opt = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9, weight_decay=1e-4)
        losses = []
        model.train()
        with EventStorage(0) as storage:
            for it, batch in enumerate(batches):
                storage.iter = it
                loss_dict = model(batch)
                total = sum(loss_dict.values())
                opt.zero_grad()
                total.backward()
                opt.step()
                losses.append({k: v.item() for k, v in sorted(loss_dict.items())})
            state = digest(sorted(in_old_layout(model.state_dict()).items()))
            outputs = inference_outputs(model, cfg)
            head_outputs = predictor_outputs(model)
        record = {
            "losses": losses,
            "state": state,
            "outputs": digest(outputs),
            "num_detections": [int(len(t)) for n, t in outputs if n.endswith("scores")],
            "layout": layout_of(model.state_dict()),
            "predictor_outputs": digest(head_outputs),
        }
        return record, model, cfg


class TestGolden(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if os.environ.get("FASA_SEESAW_RECORD_GOLDEN") == "1":
            records = {}
            for family in FAMILIES:
                records[family], model, _ = run_family(family)
                if family in OLD_PREDICTOR_FILES:
                    state = {k: v.state_dict() for k, v in predictors(model).items()}
                    torch.save(state, predictor_file(family))
            os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
            with open(GOLDEN, "w") as f:
                json.dump(records, f, indent=1, sort_keys=True)
        with open(GOLDEN) as f:
            cls.golden = json.load(f)

    def check_family(self, family):
        record, model, cfg = run_family(family)
        want = self.golden[family]
        self.assertEqual(record["layout"], want["layout"], "state-dict layout changed")
        self.assertEqual(record["losses"], want["losses"])
        self.assertEqual(record["state"], want["state"])
        self.assertEqual(record["num_detections"], want["num_detections"])
        self.assertEqual(record["outputs"], want["outputs"])
        # Loss keys and values are real: every loss finite and the detections non-empty.
        self.assertTrue(all(np.isfinite(v) for step in record["losses"] for v in step.values()))
        self.assertGreater(sum(record["num_detections"]), 0)
        return model, cfg

    def test_ce(self):
        self.check_family("ce")

    def test_seesaw(self):
        self.check_family("seesaw")

    def test_fasa_seesaw(self):
        model, _ = self.check_family("fasa_seesaw")
        # The FASA loss was on after warm-up, so the draws are part of what is compared.
        self.assertGreater(self.golden["fasa_seesaw"]["losses"][-1]["loss_fasa"], 0.0)

    def test_cascade_seesaw(self):
        self.check_family("cascade_seesaw")

    def test_old_predictor_files(self):
        """Box predictors saved by the recording code load strictly into today's models and give
        the recorded scores, deltas and probabilities."""
        for family in OLD_PREDICTOR_FILES:
            with self.subTest(family=family):
                torch.manual_seed(0)
                model = build_model(golden_cfg(family))
                saved = torch.load(predictor_file(family), map_location="cpu")
                for name, p in predictors(model).items():
                    p.load_state_dict(saved[name], strict=True)
                with single_thread():
                    outputs = digest(predictor_outputs(model))
                self.assertEqual(outputs, self.golden[family]["predictor_outputs"])

    def test_checkpoint_roundtrip(self):
        """A checkpoint in the layout of before (the predictor holding class_counts, fasa_bank.*,
        fasa_probs*) and one in today's both load with no missing or unexpected key and give the
        recorded outputs."""
        import tempfile

        _, model, cfg = run_family("fasa_seesaw")
        state = model.state_dict()
        self.assertNotEqual(set(in_old_layout(state)), set(state))  # the layouts differ
        for layout, weights in (("old", in_old_layout(state)), ("new", state)):
            with self.subTest(layout=layout), tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.pth")
                torch.save({"model": weights}, path)
                torch.manual_seed(1)
                fresh = build_model(cfg)
                saved = torch.load(path, map_location="cpu", weights_only=False)["model"]
                fresh.load_state_dict(saved, strict=True)  # raises on a missing/unexpected key
                fresh = build_model(cfg)
                DetectionCheckpointer(fresh).load(path)  # detectron2's own loading
                for k, v in fresh.state_dict().items():
                    self.assertTrue(torch.equal(v, state[k]), k)
                with single_thread():
                    outputs = digest(inference_outputs(fresh, cfg))
                self.assertEqual(outputs, self.golden["fasa_seesaw"]["outputs"])


if __name__ == "__main__":
    unittest.main()
