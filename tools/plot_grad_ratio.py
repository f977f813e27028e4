#!/usr/bin/env python
# Copyright (c) fasa_seesaw contributors.
"""
Compare the positive / negative gradient ratios of several runs in one figure (Seesaw
supplement, Figure A1), from the grad_stats.csv files that FASA_SEESAW.GRAD_STATS.ENABLED writes:

    python tools/plot_grad_ratio.py output/ce/grad_stats.csv output/seesaw/grad_stats.csv \
        --names CE Seesaw --out grad_ratio_ce_vs_seesaw.png
"""

import argparse
import numpy as np
import os
import sys

from fasa_seesaw.evaluation.category_table import read_grad_stats_csv
from fasa_seesaw.evaluation.figures import plot_grad_ratio


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("csv", nargs="+", help="grad_stats.csv files, one per run")
    parser.add_argument(
        "--names", nargs="+", help="a legend name per file (default: each file's folder name)"
    )
    parser.add_argument("--out", default="grad_ratio_comparison.png", help="the PNG to write")
    parser.add_argument("--title", default="", help="figure title")
    args = parser.parse_args(argv)
    if len(args.csv) < 2:
        parser.error("give two or more grad_stats.csv files to compare")
    if args.names is not None and len(args.names) != len(args.csv):
        parser.error(f"{len(args.names)} --names for {len(args.csv)} files")
    return args


def main(argv=None):
    args = parse_args(argv)
    names = args.names or [
        os.path.basename(os.path.dirname(os.path.abspath(p))) or p for p in args.csv
    ]
    if len(set(names)) != len(names):
        sys.exit(f"error: legend names {names} repeat; give distinct --names")
    runs = [read_grad_stats_csv(p) for p in args.csv]
    ref = runs[0]
    for path, run in zip(args.csv[1:], runs[1:]):
        if not np.array_equal(run["category_id"], ref["category_id"]):
            sys.exit(
                f"error: {path} has other categories than {args.csv[0]}; "
                "compare runs on the same training dataset"
            )
    series = {name: run["ratio"] for name, run in zip(names, runs)}
    out = plot_grad_ratio(
        series,
        ref["train_images"],
        ref["frequency"],
        args.out,
        title=args.title or "Cumulative positive / negative classification gradient per category",
        names=list(ref["name"]),
    )
    print(out)
    return out


if __name__ == "__main__":
    main()
