#!/usr/bin/env python
# Copyright (c) fasa_seesaw contributors.
"""
Evaluate a saved LVIS-format results json (e.g. train_net.py's lvis_instances_results.json)
on an LVIS-format ground-truth json: LVIS AP (AP, AP50, AP75, APs, APm, APl, APr, APc, APf),
AP-Fixed, AP-Pool, TIDE errors, and per-category AP as CSV and PNG.

Examples:
    python tools/evaluate_lvis.py lvis_v1_val.json output/inference/lvis_instances_results.json
    python tools/evaluate_lvis.py VAL.json RESULTS.json --iou-type segm --engine lvis \\
        --extras fixed pool tide --train-json TRAIN.json --out eval_out/

Results files hold detections with 1-based LVIS category ids, as detectron2's LVIS evaluator
writes them. Nothing existing in --out is overwritten: new files get a numbered name.
"""

import argparse
import logging
import os
import sys
import time

from fasa_seesaw.evaluation.lvis_engines import ENGINES
from fasa_seesaw.evaluation.report import EXTRAS, evaluate_report, format_table
from fasa_seesaw.evaluation.results import EvaluationInputError, load_lvis_gt, load_results


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("gt", help="LVIS-format ground-truth json (categories with 'frequency')")
    ap.add_argument("results", help="LVIS-format results json (a list of detections)")
    ap.add_argument(
        "--iou-type",
        nargs="+",
        choices=["bbox", "segm"],
        default=None,
        help="default: bbox, plus segm when the results carry masks",
    )
    ap.add_argument("--engine", choices=ENGINES, default="hotcoco")
    ap.add_argument(
        "--extras",
        nargs="*",
        choices=EXTRAS,
        default=list(EXTRAS),
        help="extra metrics (default: all): fixed = AP-Fixed, pool = AP-Pool, tide = TIDE errors",
    )
    ap.add_argument("--max-dets", type=int, default=300, help="per-image cap of standard AP")
    ap.add_argument("--fixed-k", type=int, default=10000, help="K of AP-Fixed / AP-Pool")
    ap.add_argument(
        "--train-json", default=None, help="training json, for per-category training image counts"
    )
    ap.add_argument(
        "--out",
        default=None,
        help="output folder (default: next to the results, <results dir>/lvis_eval)",
    )
    ap.add_argument("--no-figures", action="store_true")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        gt = load_lvis_gt(args.gt)
        results = load_results(args.results)
        if args.train_json and not os.path.isfile(args.train_json):
            raise EvaluationInputError(f"--train-json '{args.train_json}' does not exist.")
        iou_types = args.iou_type
        if iou_types is None:
            has_seg = bool(results) and "segmentation" in results[0]
            has_box = bool(results) and "bbox" in results[0]
            iou_types = (["bbox"] if has_box or not has_seg else []) + (["segm"] if has_seg else [])
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.results)), "lvis_eval")
        t0 = time.perf_counter()
        res = evaluate_report(
            gt,
            results,
            iou_types=iou_types,
            engine=args.engine,
            max_dets=args.max_dets,
            extras=args.extras,
            fixed_k=args.fixed_k,
            out_dir=out,
            train_json=args.train_json,
            figures=not args.no_figures,
        )
        dt = time.perf_counter() - t0
    except EvaluationInputError as e:
        sys.exit(f"error: {e}")
    print(format_table(res))
    for iou_type, m in res.items():
        print(f"\n[{iou_type}]")
        for k, v in m.items():
            print(f"  {k:18s} {v:.4f}" if isinstance(v, float) else f"  {k:18s} {v}")
    print(f"\n{len(results)} detections evaluated in {dt:.1f} s ({args.engine}); files in {out}")


if __name__ == "__main__":
    main()
