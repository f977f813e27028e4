# Copyright (c) fasa_seesaw contributors.
"""
detectron2's own ROI-head tests (test_roi_heads.py, test_fast_rcnn.py, test_model_e2e.py), run
unchanged from the pinned detectron2 source with LongTailROIHeads, LongTailCascadeROIHeads and
LongTailFastRCNNOutputLayers standing in for detectron2's classes (Seesaw and FASA off): losses
from seeded weights, inference, TorchScript scripting and tracing must all come out as
detectron2's tests expect (tests/detectron2_dropin/run.py).

The source is $DETECTRON2_SOURCE, else the local directory detectron2 was installed from (pip's
direct_url.json); the test is skipped when neither holds detectron2's tests.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import unittest
from urllib.parse import urlparse
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "tests", "detectron2_dropin", "run.py")


def detectron2_source():
    candidates = [os.environ.get("DETECTRON2_SOURCE", "")]
    try:
        info = json.loads(
            importlib.metadata.distribution("detectron2").read_text("direct_url.json")
        )
        url = urlparse(info.get("url", ""))
        if url.scheme == "file":
            candidates.append(url.path)
    except (importlib.metadata.PackageNotFoundError, TypeError, ValueError):
        pass
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "tests", "modeling", "test_roi_heads.py")):
            return path
    return None


@pytest.mark.slow
class TestDetectron2DropIn(unittest.TestCase):
    def test_detectron2_roi_head_tests_pass(self):
        source = detectron2_source()
        if source is None:
            self.skipTest("detectron2's source tree (with tests/) is not available")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        r = subprocess.run(
            [sys.executable, RUNNER, source],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
        tail = r.stdout[-3000:] + r.stderr[-2000:]
        self.assertEqual(r.returncode, 0, tail)
        self.assertIn(" passed", r.stdout, tail)
        self.assertNotIn(" failed", r.stdout, tail)
        built = int(r.stdout.split("LongTailFastRCNNOutputLayers built ")[1].split()[0])
        self.assertGreater(built, 0, tail)


if __name__ == "__main__":
    unittest.main()
