# Copyright (c) fasa_seesaw contributors.
"""
LVIS evaluation that runs on numpy 2.

The PyPI release of lvis (0.5.3) calls ``np.float`` in ``LVISEval.accumulate``, an alias numpy
removed in 1.24. Instead of editing the installed package, ``lvis_numpy2_compat`` points the
``np`` name inside ``lvis.eval`` (only there, only while evaluating) at a view of numpy that
still has the old builtin aliases.
"""

import contextlib
import logging
import numpy as np
import threading
import types

from detectron2.evaluation import LVISEvaluator

__all__ = ["LongTailLVISEvaluator", "lvis_numpy2_compat"]

logger = logging.getLogger(__name__)

# numpy < 1.24 aliases of Python builtins that lvis-api still uses.
_REMOVED_ALIASES = {"float": float, "int": int, "bool": bool, "object": object, "complex": complex}
_lock = threading.Lock()


class _NumpyWithAliases(types.ModuleType):
    def __init__(self):
        super().__init__("numpy")

    def __getattr__(self, name):
        if name in _REMOVED_ALIASES and not hasattr(np, name):
            return _REMOVED_ALIASES[name]
        return getattr(np, name)


@contextlib.contextmanager
def lvis_numpy2_compat():
    """Run lvis-api's evaluation on any numpy version without changing installed files."""
    import lvis.eval as lvis_eval_module

    with _lock:
        original = lvis_eval_module.np
        lvis_eval_module.np = _NumpyWithAliases()
        try:
            yield
        finally:
            lvis_eval_module.np = original


class LongTailLVISEvaluator(LVISEvaluator):
    """detectron2's LVISEvaluator (AP, APr, APc, APf for bbox and segm), numpy-2 safe."""

    def _eval_predictions(self, predictions):
        with lvis_numpy2_compat():
            super()._eval_predictions(predictions)
