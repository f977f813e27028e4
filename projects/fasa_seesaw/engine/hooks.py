# Copyright (c) fasa_seesaw contributors.
import datetime
import logging
import numpy as np
import sys
import time
import torch

from detectron2.engine import HookBase
from detectron2.utils import comm

from .rng import get_rng_states, set_rng_states

__all__ = ["ProgressHook", "RNGStateHook"]

logger = logging.getLogger(__name__)


class ProgressHook(HookBase):
    """
    One short line every ``period`` iterations: iteration, percent done, seconds per iteration
    and the ETA of training, measured over the iterations since the hook started (so the one-off
    start-up cost does not inflate it).
    """

    def __init__(self, period: int, max_iter: int, stream=None):
        self._period = period
        self._max_iter = max_iter
        self._stream = stream or sys.stdout
        self._start_time = None
        self._start_iter = None

    def before_train(self):
        self._start_time = None

    def after_step(self):
        if not comm.is_main_process():
            return
        it = self.trainer.iter + 1
        if self._start_time is None:
            # Skip the first iteration: it includes data loader start-up.
            self._start_time, self._start_iter = time.perf_counter(), it
            return
        if it % self._period != 0 and it != self._max_iter:
            return
        done = it - self._start_iter
        sec_per_iter = (time.perf_counter() - self._start_time) / max(done, 1)
        eta = datetime.timedelta(seconds=int(sec_per_iter * (self._max_iter - it)))
        line = (
            f"[progress] iter {it}/{self._max_iter} ({100.0 * it / self._max_iter:5.1f}%) "
            f"{sec_per_iter:.3f} s/it, training ETA {eta}"
        )
        print(line, file=self._stream, flush=True)


class RNGStateHook(HookBase):
    """
    Puts the main process's random states (python, numpy, torch and each accelerator's, as
    :func:`fasa_seesaw.engine.rng.get_rng_states` reads them) into every checkpoint
    and restores them on resume, so proposal sampling and FASA's draws continue as if the run
    had never stopped. Holds no state of its own between checkpoints.
    """

    # Checkpoints are read with torch.load(weights_only=True): tensors and plain Python only,
    # so numpy's key array travels as a tensor.
    def state_dict(self):
        state = get_rng_states()
        kind, keys, pos, has_gauss, cached = state["numpy"]
        state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
        return state

    def load_state_dict(self, state):
        kind, keys, pos, has_gauss, cached = state["numpy"]
        numpy_state = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
        set_rng_states(dict(state, numpy=numpy_state))
