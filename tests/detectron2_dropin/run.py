# Copyright (c) fasa_seesaw contributors.
"""
Runs detectron2's own ROI-head tests with the project's heads and predictor standing in for
detectron2's, Seesaw and FASA off:

    python tests/detectron2_dropin/run.py DETECTRON2_SOURCE [pytest args]

Before pytest imports detectron2's test files, ``StandardROIHeads``, ``CascadeROIHeads`` and
``FastRCNNOutputLayers`` are replaced, in detectron2's modules and in its ROI-head registry, by
``LongTailROIHeads``, ``LongTailCascadeROIHeads`` and ``LongTailFastRCNNOutputLayers``, and the
project's config keys are added to detectron2's defaults (with their defaults: detectron2's loss,
linear classifier, FASA off). The test files themselves run unchanged.
"""

import os
import sys

TESTS = (
    "tests/modeling/test_roi_heads.py",
    "tests/modeling/test_fast_rcnn.py",
    "tests/modeling/test_model_e2e.py",
)


def stand_in():
    import detectron2.modeling as modeling
    import detectron2.modeling.roi_heads as roi_heads_pkg
    from detectron2.config.defaults import _C
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, cascade_rcnn, fast_rcnn, roi_heads

    from fasa_seesaw import add_fasa_seesaw_config
    from fasa_seesaw.modeling import (
        LongTailCascadeROIHeads,
        LongTailFastRCNNOutputLayers,
        LongTailROIHeads,
    )

    add_fasa_seesaw_config(_C)
    swaps = {
        "StandardROIHeads": LongTailROIHeads,
        "CascadeROIHeads": LongTailCascadeROIHeads,
        "FastRCNNOutputLayers": LongTailFastRCNNOutputLayers,
    }
    for module in (modeling, roi_heads_pkg, roi_heads, cascade_rcnn, fast_rcnn):
        for name, cls in swaps.items():
            if hasattr(module, name):
                setattr(module, name, cls)
    for name in ("StandardROIHeads", "CascadeROIHeads"):
        ROI_HEADS_REGISTRY._obj_map[name] = swaps[name]


class _CountPredictors:
    """Fails the run unless detectron2's tests built the project's predictor (so a broken
    stand-in cannot pass by testing detectron2's own classes)."""

    def __init__(self):
        from fasa_seesaw.modeling import LongTailFastRCNNOutputLayers

        self.built = 0
        init = LongTailFastRCNNOutputLayers.__init__

        def counting_init(predictor, *args, **kwargs):
            self.built += 1
            init(predictor, *args, **kwargs)

        counting_init.__wrapped__ = init  # detectron2's @configurable reads the signature
        LongTailFastRCNNOutputLayers.__init__ = counting_init

    def pytest_sessionfinish(self, session, exitstatus):
        print(f"\n[dropin] LongTailFastRCNNOutputLayers built {self.built} times")
        if self.built == 0:
            session.exitstatus = 1


def main(argv):
    import pytest

    source, extra = argv[0], argv[1:]
    stand_in()
    counter = _CountPredictors()
    os.chdir(source)
    return pytest.main(["-q", "-p", "no:cacheprovider", *TESTS, *extra], plugins=[counter])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
