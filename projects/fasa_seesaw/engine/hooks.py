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
    Puts every process's random states (python, numpy, torch and each accelerator's, as
    :func:`fasa_seesaw.engine.rng.get_rng_states` reads them) into every checkpoint and gives each
    process its own back on resume, so proposal sampling and FASA's draws continue on every rank
    as if the run had never stopped.

    Only the main process writes checkpoints, so the states are gathered from all processes in
    the step of a checkpoint (this hook runs right before the checkpointer, and the steps are
    those of detectron2's PeriodicCheckpointer: every ``period`` iterations and the last).
    """

    def __init__(self, period: int = 0, max_iter: int = 0):
        self._period, self._max_iter = period, max_iter
        self._ranks = None  # the states of every rank, as of iteration self._at
        self._at = None

    def _checkpoint_step(self, it: int) -> bool:
        return (self._period > 0 and (it + 1) % self._period == 0) or it >= self._max_iter - 1

    def after_step(self):
        if comm.get_world_size() > 1 and self._checkpoint_step(self.trainer.iter):
            self._ranks = comm.all_gather(_portable(get_rng_states()))
            self._at = self.trainer.iter

    # Checkpoints are read with torch.load(weights_only=True): tensors and plain Python only,
    # so numpy's key array travels as a tensor.
    def state_dict(self):
        if comm.get_world_size() == 1:
            return {"ranks": [_portable(get_rng_states())]}
        if self._at != self.trainer.iter:
            logger.warning(
                "The other processes' random states are not at hand for this checkpoint (it is "
                "written outside detectron2's checkpoint steps, or after a resume with another "
                "number of processes): a resume from it gives every process this one's."
            )
            return {"ranks": [_portable(get_rng_states())]}
        return {"ranks": self._ranks}

    def load_state_dict(self, state):
        ranks = state["ranks"] if "ranks" in state else [state]  # one state: older checkpoints
        rank, world = comm.get_rank(), comm.get_world_size()
        if len(ranks) != world:
            logger.warning(
                "The checkpoint holds the random states of %d process(es), this run has %d: "
                "every process restores the first one, so the run goes on, not as it would have.",
                len(ranks),
                world,
            )
        mine = ranks[rank] if len(ranks) == world else ranks[0]
        set_rng_states(_restored(mine))
        # A checkpoint written again at this iteration (a completed model_final.pth) holds them.
        self._ranks, self._at = ranks, self.trainer.iter if len(ranks) == world else None


def _portable(state: dict) -> dict:
    kind, keys, pos, has_gauss, cached = state["numpy"]
    return dict(
        state, numpy=(kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    )


def _restored(state: dict) -> dict:
    kind, keys, pos, has_gauss, cached = state["numpy"]
    return dict(state, numpy=(kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
