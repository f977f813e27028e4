# Copyright (c) fasa_seesaw contributors.
"""
train_net.py's launch path with a probe in every process: ``python tests/ddp_probe.py <train_net.py
arguments>``. Each rank writes ``OUTPUT_DIR/probe_rank<r>.pt`` at the end of training: its
long-tail state (Seesaw counts, FASA bank and probabilities, the adaptation hook's groups), its
parameters, and the foreground RoIs it counted itself (before any all-reduce). With
``FASA_SEESAW_PROBE_STOP_AFTER=k`` in the environment every rank stops after iteration k, as a
crash would, after that step's checkpoint.

The patches sit at module level: the processes detectron2's launch spawns import this file
again (as ``__mp_main__``), so they apply in every rank.
"""

import os
import sys
import torch

import detectron2.utils.comm as comm
from detectron2.engine import HookBase, launch

from fasa_seesaw.engine import Trainer
from fasa_seesaw.engine.fasa_hook import FASAAdaptationHook
from fasa_seesaw.modeling.seesaw_loss import SeesawLoss, count_foreground

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_net  # noqa: E402

_local_counts = {}  # id(loss) -> this rank's own foreground RoIs per class
_update_counts = SeesawLoss.update_counts


def update_counts(self, gt_classes):
    own = count_foreground(gt_classes, self.num_classes, dtype=self.class_counts.dtype)
    _local_counts[id(self)] = _local_counts.get(id(self), 0) + own
    _update_counts(self, gt_classes)


class Probe(HookBase):
    def after_step(self):
        stop = os.environ.get("FASA_SEESAW_PROBE_STOP_AFTER")
        if stop is not None and self.trainer.iter == int(stop):
            raise RuntimeError(f"stopped after iteration {stop}")

    def after_train(self):
        model = self.trainer.model
        model = getattr(model, "module", model)
        fasa_hooks = [h for h in self.trainer._hooks if isinstance(h, FASAAdaptationHook)]
        loss = model.roi_heads.box_predictor.cls_loss
        torch.save(
            {
                "state": {k: v.clone() for k, v in model.state_dict().items()},
                "local_counts": _local_counts.get(id(loss)),
                "groups": [g.copy() for g in fasa_hooks[0].groups] if fasa_hooks else None,
                "passes": fasa_hooks[0].passes if fasa_hooks else 0,
                "iter": self.trainer.iter,
            },
            os.path.join(self.trainer.cfg.OUTPUT_DIR, f"probe_rank{comm.get_rank()}.pt"),
        )


_build_hooks = Trainer.build_hooks


def build_hooks(self):
    return _build_hooks(self) + [Probe()]


SeesawLoss.update_counts = update_counts
Trainer.build_hooks = build_hooks

if __name__ == "__main__":
    args = train_net.argument_parser().parse_args()
    train_net.preflight(args)
    launch(
        train_net.main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
