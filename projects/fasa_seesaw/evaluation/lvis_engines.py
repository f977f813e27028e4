# Copyright (c) fasa_seesaw contributors.
"""
LVIS evaluation with two engines that give the same numbers.

- ``"lvis"``: the official lvis-api (``lvis`` 0.5.3 on PyPI), run on numpy 2 through
  :func:`lvis_numpy2_compat` without editing the installed package. The reference.
- ``"hotcoco"``: hotcoco (PyPI), a Rust implementation of COCO/LVIS evaluation, in its LVIS mode
  (``lvis_style=True``). Tens of times faster.

Both engines are fed the same prepared inputs, so that they agree exactly (the parity tests
check every metric and every category's AP to 1e-6):

- results are checked first (:func:`~fasa_seesaw.evaluation.results.prepare_results`): unknown
  image or category ids, empty results, NaN scores, and a file of the wrong kind (masks evaluated
  as boxes, boxes as masks) are refused with a message that says what to do;
- segm results lose their ``bbox`` so that small/medium/large use the mask area (detectron2's
  LVISEvaluator does the same; lvis-api would otherwise take the box area of every result when
  the first one carries a box);
- the per-image cap (300 for LVIS, :func:`~fasa_seesaw.evaluation.caps.cap_per_image`) is
  applied here, exactly as lvis-api's ``LVISResults.limit_dets_per_image`` does it (stable sort
  by score within an image, so ties keep the order of the results file), and then results of
  zero area are dropped, as lvis-api's ``get_ann_ids`` does after its cap;
- hotcoco gets ground truth without zero-area annotations and with ``iscrowd`` 0, which is what
  lvis-api evaluates (it never loads zero-area annotations and never reads ``iscrowd``).

Metrics are in percent, as detectron2 reports them. A metric that lvis-api reports as -1 (a
group without ground truth, e.g. APr when the split has no rare class) is NaN here.
"""

import contextlib
import copy
import io
import logging
import numpy as np
import os
import threading
import types
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union
import pycocotools.mask as mask_util

from .caps import cap_per_image
from .results import EmptyResultsError, EvaluationInputError, load_lvis_gt, prepare_results

__all__ = [
    "ENGINES",
    "METRIC_KEYS",
    "LVISEvalOutput",
    "lvis_numpy2_compat",
    "evaluate_lvis",
]

logger = logging.getLogger(__name__)

ENGINES = ("hotcoco", "lvis")
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
AREA_LABELS = ("all", "small", "medium", "large")


# --------------------------------------------------------------------------------------------
# lvis-api on numpy 2
# --------------------------------------------------------------------------------------------
# numpy < 1.24 aliases of Python builtins that lvis-api still uses.
_REMOVED_ALIASES = {"float": float, "int": int, "bool": bool, "object": object, "complex": complex}
_lock = threading.RLock()


class _NumpyWithAliases(types.ModuleType):
    def __init__(self):
        super().__init__("numpy")

    def __getattr__(self, name):
        if name in _REMOVED_ALIASES and not hasattr(np, name):
            return _REMOVED_ALIASES[name]
        return getattr(np, name)


@contextlib.contextmanager
def lvis_numpy2_compat():
    """
    Run lvis-api's evaluation on any numpy version without changing installed files: the ``np``
    name inside ``lvis.eval`` (only there, only while evaluating) points at a view of numpy that
    still has the builtin aliases numpy 1.24 removed (``np.float`` in ``LVISEval.accumulate``).
    """
    import lvis.eval as lvis_eval_module

    with _lock:
        original = lvis_eval_module.np
        lvis_eval_module.np = _NumpyWithAliases()
        try:
            yield
        finally:
            lvis_eval_module.np = original


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
@dataclass
class LVISEvalOutput:
    """What one evaluation gives."""

    iou_type: str
    engine: str
    metrics: Dict[str, float]  # METRIC_KEYS (+ AR@300 style keys), percent; NaN = no GT
    cat_ids: List[int]  # sorted category ids (the order of per_category_ap)
    per_category_ap: np.ndarray  # (K,) percent, NaN where a category has no GT
    precision: np.ndarray = field(repr=False)  # (T, R, K, A) as lvis-api, -1 = no GT
    img_ids: List[int] = field(default_factory=list)
    eval_imgs: Optional[list] = field(default=None, repr=False)  # per (image, category, area)
    evaluator: object = field(default=None, repr=False)  # the engine's eval object


def _per_category_ap(precision: np.ndarray) -> np.ndarray:
    p = precision[:, :, :, 0]  # area "all"
    valid = p > -1
    n = valid.sum(axis=(0, 1))
    sums = np.where(valid, p, 0.0).sum(axis=(0, 1))
    ap = np.full(p.shape[2], np.nan)
    ap[n > 0] = sums[n > 0] / n[n > 0] * 100.0
    return ap


def _to_percent(raw: Dict[str, float]) -> Dict[str, float]:
    out = {}
    for k in sorted(raw, key=lambda k: (METRIC_KEYS.index(k) if k in METRIC_KEYS else 99, k)):
        v = raw[k]
        v = float(v)
        out[k] = float("nan") if v == -1 else v * 100.0
    return out


def _area(result: dict, iou_type: str) -> float:
    if iou_type == "bbox":
        return float(result["bbox"][2]) * float(result["bbox"][3])
    return float(mask_util.area(result["segmentation"]))


def _drop_empty(results, iou_type: str):
    if isinstance(results, np.ndarray):
        return results[results[:, 3] * results[:, 4] > 0]
    return [r for r in results if _area(r, iou_type) > 0]


def _normalise_eval_imgs_lvis(ev) -> list:
    out = []
    for e in ev.eval_imgs:
        if e is None:
            continue
        out.append(
            {
                "image_id": e["image_id"],
                "category_id": e["category_id"],
                "area_rng": list(e["area_rng"]),
                "dt_scores": np.asarray(e["dt_scores"], dtype=np.float64),
                "dt_matches": np.asarray(e["dt_matches"], dtype=np.float64),
                "dt_ignore": np.asarray(e["dt_ignore"], dtype=bool),
                "gt_ignore": np.asarray(e["gt_ignore"], dtype=bool),
            }
        )
    return out


def _normalise_eval_imgs_hotcoco(ev) -> list:
    out = []
    for e in ev.eval_imgs:
        if e is None:
            continue
        n, t = len(e["dtScores"]), len(e["dtMatches"])
        out.append(
            {
                "image_id": e["image_id"],
                "category_id": e["category_id"],
                "area_rng": list(e["aRng"]),
                "dt_scores": np.asarray(e["dtScores"], dtype=np.float64),
                "dt_matches": np.asarray(e["dtMatches"], dtype=np.float64).reshape(t, n),
                "dt_ignore": np.asarray(e["dtIgnore"], dtype=bool).reshape(t, n),
                "gt_ignore": np.asarray(e["gtIgnore"], dtype=bool),
            }
        )
    return out


def _run_lvis(gt, results, iou_type, img_ids, area_rng, max_dets):
    from lvis import LVIS, LVISEval, LVISResults

    lvis_gt = LVIS.__new__(LVIS)
    lvis_gt.logger = logging.getLogger("lvis.lvis")
    lvis_gt.dataset = copy.deepcopy(gt)
    lvis_gt._create_index()
    if isinstance(results, np.ndarray):
        results = [
            {
                "image_id": int(r[0]),
                "bbox": [float(v) for v in r[1:5]],
                "score": float(r[5]),
                "category_id": int(r[6]),
            }
            for r in results
        ]
    with lvis_numpy2_compat():
        dt = LVISResults(lvis_gt, copy.deepcopy(results), max_dets=-1)
        ev = LVISEval(lvis_gt, dt, iou_type)
        if img_ids is not None:
            ev.params.img_ids = sorted(set(img_ids))
        if area_rng is not None:
            ev.params.area_rng = [list(a) for a in area_rng]
            ev.params.area_rng_lbl = [f"area{i}" for i in range(len(area_rng))]
        ev.evaluate()
        ev.accumulate()
        if area_rng is None:
            ev.summarize()
    raw = dict(ev.results) if area_rng is None else {}
    return ev, raw, np.asarray(ev.eval["precision"], dtype=np.float64)


def _hotcoco_gt(gt: dict) -> dict:
    g = dict(gt)
    g["annotations"] = [dict(a, iscrowd=0) for a in gt["annotations"] if a.get("area", 1) > 0]
    return g


# hotcoco, like COCO, also keeps at most params.max_dets (300) detections per image AND category
# while matching; lvis-api has no per-category cut. The per-image cap is applied before either
# engine sees the results, so hotcoco's cut is lifted to match lvis-api when more than 300 per
# image can reach it (AP-Fixed, AP-Pool).
_NO_CUT = 2**31 - 1


def hotcoco_lvis_eval(gt: dict, results, iou_type: str, max_dets: int):
    """A hotcoco LVIS-mode evaluator over already capped ``results``, matching lvis-api."""
    import hotcoco

    G = hotcoco.COCO(_hotcoco_gt(gt))
    ev = hotcoco.COCOeval(
        G, hotcoco.LVISResults(G, results, max_dets=-1), iou_type, lvis_style=True
    )
    if max_dets is None or max_dets < 0 or max_dets > 300:
        p = ev.params
        p.max_dets = [_NO_CUT]
        ev.params = p
    return ev


def _ar_keys_as_lvis(raw: Dict[str, float]) -> Dict[str, float]:
    """lvis-api always names recall AR@300 (its params.max_dets); hotcoco uses the cut."""
    return {k.replace(f"@{_NO_CUT}", "@300"): v for k, v in raw.items()}


def _run_hotcoco(gt, results, iou_type, img_ids, area_rng, max_dets):
    ev = hotcoco_lvis_eval(gt, results, iou_type, max_dets)
    if img_ids is not None:
        p = ev.params
        p.img_ids = sorted(set(img_ids))
        ev.params = p
    if area_rng is not None:
        p = ev.params
        p.area_rng = [list(a) for a in area_rng]
        p.area_rng_lbl = [f"area{i}" for i in range(len(area_rng))]
        ev.params = p
    ev.evaluate()
    ev.accumulate()
    raw = {}
    if area_rng is None:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*max_dets differ.*")  # the lifted cut
            ev.summarize()
        raw = _ar_keys_as_lvis(ev.get_results())
    precision = np.asarray(ev.eval["precision"], dtype=np.float64)[..., 0]
    return ev, raw, precision


def evaluate_lvis(
    gt: Union[str, os.PathLike, dict],
    results: Union[List[dict], str, os.PathLike],
    iou_type: str = "bbox",
    engine: str = "hotcoco",
    max_dets: int = 300,
    img_ids: Optional[Sequence[int]] = None,
    keep_eval_imgs: bool = False,
    area_rng: Optional[Sequence[Sequence[float]]] = None,
    prepared: bool = False,
) -> LVISEvalOutput:
    """
    Standard LVIS evaluation (AP, AP50, AP75, APs/m/l, APr/c/f and per-category AP).

    Args:
        gt: an LVIS-format json path or dict (with category ``frequency``).
        results: detections, a list of dicts or a json path, category ids as in the json.
        iou_type: "bbox" or "segm".
        engine: "hotcoco" (fast) or "lvis" (lvis-api).
        max_dets: per-image cap (300 for LVIS; -1: none, as AP-Fixed needs).
        img_ids: evaluate these images only (default: all images of ``gt``).
        keep_eval_imgs: also return the per-(image, category, area) matching results in one
            layout for both engines (what AP-Pool is built from).
        area_rng: replace the four area ranges (AP-Pool uses [[0, 1e10]]); then only the
            precision array and eval_imgs are filled, not the summary metrics.
        prepared: ``gt`` came from :func:`load_lvis_gt` and ``results`` from
            :func:`prepare_results`.
    """
    if engine not in ENGINES:
        raise EvaluationInputError(f"unknown LVIS engine {engine!r}; choose one of {ENGINES}.")
    if max_dets is not None and max_dets == 0:
        raise EvaluationInputError("max_dets must be positive (300 for LVIS) or -1 for no cap.")
    if not prepared:
        gt = load_lvis_gt(gt)
        results = prepare_results(gt, results, iou_type, img_ids)
    results = _drop_empty(cap_per_image(results, max_dets), iou_type)
    if len(results) == 0:
        raise EmptyResultsError("every detection has zero area; there is nothing to evaluate.")
    run = _run_hotcoco if engine == "hotcoco" else _run_lvis
    ev, raw, precision = run(gt, results, iou_type, img_ids, area_rng, max_dets)
    cat_ids = [int(c) for c in ev.params.cat_ids]
    eval_imgs = None
    if keep_eval_imgs:
        norm = _normalise_eval_imgs_hotcoco if engine == "hotcoco" else _normalise_eval_imgs_lvis
        eval_imgs = norm(ev)
    metrics = _to_percent(raw)
    return LVISEvalOutput(
        iou_type=iou_type,
        engine=engine,
        metrics=metrics,
        cat_ids=cat_ids,
        per_category_ap=_per_category_ap(precision),
        precision=precision,
        img_ids=[int(i) for i in ev.params.img_ids],
        eval_imgs=eval_imgs,
        evaluator=ev,
    )
