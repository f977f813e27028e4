# Copyright (c) fasa_seesaw contributors.
"""
The mmdetection layouts the converter's tests use (fasa_seesaw.modelzoo.layout) against
mmdetection's real models: the same keys and shapes. Skipped unless mmdetection is installed
(dev/setup_mmdet.sh; the project never needs it).
"""

import unittest
import pytest

pytest.importorskip("mmdet")
pytest.importorskip("mmcv.ops")


@pytest.mark.slow
class TestLayoutIsMmdetections(unittest.TestCase):
    def test_every_model_of_the_equality_run(self):
        eq = self.load_tool("mmdet_equality")
        for name, mm_config, _, layout in eq.MODELS:
            with self.subTest(model=name):
                mm, _ = eq.mmdet_model(mm_config)
                diff = eq.layout_matches(mm, layout)
                self.assertEqual(diff, {k: [] for k in diff}, name)


if __name__ == "__main__":
    unittest.main()
