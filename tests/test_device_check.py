# Copyright (c) fasa_seesaw contributors.
"""dev/device_check.sh, the one script for a machine with a GPU, on its dry-run path: every CUDA
test it names is collected and every benchmark accepts the flags it passes."""

import os
import subprocess
import tempfile
import unittest
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # subprocesses
class TestDeviceCheck(unittest.TestCase):
    def test_dry_run(self):
        with tempfile.TemporaryDirectory() as d:
            r = subprocess.run(
                ["bash", os.path.join(ROOT, "dev/device_check.sh"), d],
                env=dict(os.environ, DRY_RUN="1"),
                capture_output=True,
                text=True,
            )
        self.assertEqual(r.returncode, 0, r.stdout[-2000:] + r.stderr[-2000:])
        self.assertIn("4 CUDA tests collected", r.stdout)
        self.assertIn("bench_seesaw_loss.py --device cuda", r.stdout)
        self.assertIn("bench_fasa.py --part step --device cuda", r.stdout)


if __name__ == "__main__":
    unittest.main()
