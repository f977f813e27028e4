#!/usr/bin/env python
# Copyright (c) fasa_seesaw contributors.
"""
Benchmark: what FASA (feature augmentation + sampling adaptation) costs, at LVIS v1 scale: the
parts of bench_fasa_step.py and bench_fasa_generation.py in one command and one --json file
(the --help of those two describes each part in full).

Parts (--part step|generation|pass|all):
  step        one training step of the LVIS v1 Mask R-CNN R50-FPN for CE, Seesaw, CE+FASA and
              Seesaw+FASA: time, peak memory, FASA's own work timed in isolation
  generation  virtual-feature generation against a per-class loop and the reference's
  pass        one FASA validation-loss pass against one inference + LVIS evaluation pass

Usage (from the repository root):
    python benchmarks/bench_fasa.py                          # all parts, CPU, 512 px
    python benchmarks/bench_fasa.py --part step --image-size 800 --reps 5
    python benchmarks/bench_fasa.py --part generation --json gen.json
    python benchmarks/bench_fasa.py --device cuda --json out.json   # 800 px on CUDA
"""

import sys

import fasa_common
from bench_fasa_generation import GENERATION, PASS
from bench_fasa_step import STEP


def main(argv=None):
    parts = {"step": STEP, "generation": GENERATION, "pass": PASS}
    return fasa_common.main("bench_fasa", __doc__, parts, argv)


if __name__ == "__main__":
    sys.exit(main())
