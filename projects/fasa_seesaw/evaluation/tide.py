# Copyright (c) fasa_seesaw contributors.
"""
TIDE error breakdown (Bolya et al. 2020) on LVIS, from hotcoco's implementation.

hotcoco's ``COCOeval.tide_errors`` in LVIS mode applies the federated rules (detections of
classes not verified in an image are dropped, unmatched detections of not-exhaustive classes are
not errors) and its baseline is the LVIS AP50: averaged over the categories with ground truth,
after the per-image cap. tidecv (the authors' package) approximates LVIS with whole-image ignore
regions and averages in classes without ground truth, so its AP50 is not LVIS's; it is not used.

The six error types are reported as dAP50, the AP50 gained by fixing all errors of that type
(percent): Cls (right box, wrong class), Loc (right class, poor box), Both, Dupe (duplicate
detection), Bkg (detection on background), Miss (missed ground truth).
"""

import contextlib
import io
from typing import Optional, Sequence

from .caps import cap_per_image
from .lvis_engines import _drop_empty, hotcoco_lvis_eval
from .results import load_lvis_gt, prepare_results

__all__ = ["TIDE_ERRORS", "tide_errors", "tide_from_evaluator"]

TIDE_ERRORS = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")


def tide_errors(
    gt,
    results,
    iou_type: str = "bbox",
    max_dets: int = 300,
    img_ids: Optional[Sequence[int]] = None,
    pos_thr: float = 0.5,
    bg_thr: float = 0.1,
    prepared: bool = False,
) -> dict:
    """
    Returns {"TIDE_AP50": baseline AP50, "TIDE_Cls": dAP50, ..., "TIDE_Miss": dAP50,
    "TIDE_count_Cls": number of such errors, ...}; percent.
    """
    if not prepared:
        gt = load_lvis_gt(gt)
        results = prepare_results(gt, results, iou_type, img_ids)
    results = _drop_empty(cap_per_image(results, max_dets), iou_type)
    ev = hotcoco_lvis_eval(gt, results, iou_type, max_dets)
    if img_ids is not None:
        ev.params.img_ids = sorted({int(i) for i in img_ids})
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
    return tide_from_evaluator(ev, pos_thr, bg_thr)


def tide_from_evaluator(ev, pos_thr: float = 0.5, bg_thr: float = 0.1) -> dict:
    """TIDE from a hotcoco LVIS-mode evaluator that has already matched (``evaluate()``), e.g.
    the standard evaluation's own (``LVISEvalOutput.evaluator`` of the hotcoco engine)."""
    with contextlib.redirect_stdout(io.StringIO()):
        t = ev.tide_errors(pos_thr=pos_thr, bg_thr=bg_thr)
    out = {"TIDE_AP50": float(t["ap_base"]) * 100.0}
    for k in TIDE_ERRORS:
        out[f"TIDE_{k}"] = float(t["delta_ap"][k]) * 100.0
    for k in TIDE_ERRORS:
        out[f"TIDE_count_{k}"] = int(t["counts"][k])
    return out
