# Copyright (c) fasa_seesaw contributors.
"""
INPUT.RESIZE_BACKEND: "pil" is detectron2's mapper unchanged; "cv2" resizes as mmdetection's
``Resize(scale=(1333, 800), keep_ratio=True)`` does (mmcv.imresize: cv2.resize, INTER_LINEAR),
to the size mmcv's rescale_size gives, written out here.
"""

import numpy as np
import unittest
import cv2

from detectron2.config import get_cfg
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T

from fasa_seesaw import add_fasa_seesaw_config
from fasa_seesaw.data.resize import CV2ResizeTransform, ResizeShortestEdgeCV2, build_mapper


def mmcv_size(w, h, long=1333, short=800):
    """mmcv.rescale_size with keep_ratio: one scale for both sides, each rounded half up."""
    scale = min(long / max(h, w), short / min(h, w))
    return int(w * scale + 0.5), int(h * scale + 0.5)


class TestCV2Resize(unittest.TestCase):
    # (302, 151): detectron2's rule gives 666 x 1333, mmcv's 667 x 1333
    SIZES = [
        (640, 480), (480, 640), (500, 375), (1024, 683), (128, 90), (2000, 1500), (333, 1000),
        (302, 151), (151, 302),
    ]  # fmt: skip

    def test_sizes_and_pixels_are_mmdetections(self):
        rng = np.random.default_rng(0)
        aug = ResizeShortestEdgeCV2(800, 1333, "choice")
        for w, h in self.SIZES:
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            t = aug.get_transform(img)
            self.assertIsInstance(t, CV2ResizeTransform)
            new_w, new_h = mmcv_size(w, h)
            self.assertEqual((t.new_w, t.new_h), (new_w, new_h), (w, h))
            want = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
            np.testing.assert_array_equal(t.apply_image(img), want)
            # and it is not detectron2's PIL resize
            pil = T.ResizeTransform(h, w, new_h, new_w).apply_image(img)
            self.assertGreater(np.abs(pil.astype(int) - want).max(), 0)

    def test_masks_nearest_and_coordinates(self):
        t = CV2ResizeTransform(90, 128, 800, 1138)
        seg = (np.arange(90 * 128).reshape(90, 128) % 7).astype(np.uint8)
        out = t.apply_segmentation(seg)
        self.assertEqual(out.shape, (800, 1138))
        self.assertTrue(set(np.unique(out)) <= set(np.unique(seg)))  # no blended labels
        coords = t.apply_coords(np.array([[128.0, 90.0]]))
        np.testing.assert_allclose(coords, [[1138.0, 800.0]])
        self.assertEqual(
            t.inverse().apply_image(t.apply_image(seg[:, :, None])).shape, (90, 128, 1)
        )

    def test_detectron2s_rule_differs_where_the_long_side_caps(self):
        d2 = T.ResizeShortestEdge.get_output_shape(151, 302, 800, 1333)
        self.assertEqual(d2, (666, 1333))
        self.assertEqual(mmcv_size(302, 151), (1333, 667))
        t = ResizeShortestEdgeCV2(800, 1333, "choice").get_transform(np.zeros((151, 302, 3)))
        self.assertEqual((t.new_h, t.new_w), (667, 1333))


class TestBuildMapper(unittest.TestCase):
    def _cfg(self, backend):
        cfg = get_cfg()
        add_fasa_seesaw_config(cfg)
        cfg.INPUT.RESIZE_BACKEND = backend
        return cfg

    def test_pil_is_detectron2s_mapper(self):
        for is_train in (False, True):
            ours = build_mapper(self._cfg("pil"), is_train)
            theirs = DatasetMapper(self._cfg("pil"), is_train)
            self.assertEqual(repr(ours.augmentations), repr(theirs.augmentations))

    def test_cv2_swaps_only_the_resize(self):
        for is_train in (False, True):
            augs = build_mapper(self._cfg("cv2"), is_train).augmentations.augs
            pil = DatasetMapper(self._cfg("pil"), is_train).augmentations.augs
            self.assertEqual(len(augs), len(pil))
            for a, b in zip(augs, pil):
                if isinstance(b, T.ResizeShortestEdge):
                    self.assertIsInstance(a, ResizeShortestEdgeCV2)
                    self.assertEqual(
                        (a.short_edge_length, a.max_size, a.is_range),
                        (b.short_edge_length, b.max_size, b.is_range),
                    )
                else:
                    self.assertIs(type(a), type(b))

    def test_cv2_refuses_other_resizes(self):
        from fasa_seesaw import ConfigError

        with self.assertRaisesRegex(ConfigError, "RESIZE_BACKEND cv2 replaces .* ResizeScale"):
            build_mapper(self._cfg("cv2"), True, augmentations=[T.ResizeScale(0.5, 2.0, 640, 640)])


if __name__ == "__main__":
    unittest.main()
