# Copyright (c) fasa_seesaw contributors.
"""
LVIS ground truth and detections, loaded and checked before evaluation: every engine of
:mod:`fasa_seesaw.evaluation.lvis_engines` (and AP-Fixed, AP-Pool, TIDE) evaluates what
:func:`load_lvis_gt` and :func:`prepare_results` return.

Unknown image or category ids, empty results, NaN scores and a file of the wrong kind (masks
evaluated as boxes, boxes as masks) are refused with a message that says what to do. segm results
lose their ``bbox`` so that small/medium/large use the mask area (detectron2's LVISEvaluator does
the same; lvis-api would otherwise take the box area of every result when the first one carries a
box). Well-formed box results become a compact (N, 7) array (:data:`ARRAY_COLUMNS`).
"""

import json
import numpy as np
import os
from typing import List, Optional, Sequence, Union

from ..errors import ConfigError

__all__ = [
    "ARRAY_COLUMNS",
    "EvaluationInputError",
    "EmptyResultsError",
    "load_lvis_gt",
    "load_results",
    "prepare_results",
]


class EvaluationInputError(ConfigError):
    """Ground truth or results that cannot be evaluated; the message names the problem and fix."""


class EmptyResultsError(EvaluationInputError):
    """No detections at all."""


def load_lvis_gt(gt: Union[str, os.PathLike, dict]) -> dict:
    """
    The ground-truth json as a dict, checked for what evaluation needs: the LVIS keys and a
    ``frequency`` (r/c/f) for every category (APr/APc/APf need it) and the federated lists on
    every image (as train_net.py requires them). The caller's dict is not modified.
    """
    where = None
    if not isinstance(gt, dict):
        where = os.fspath(gt)
        if not os.path.isfile(where):
            raise EvaluationInputError(f"ground-truth json '{where}' does not exist.")
        with open(where, encoding="utf-8") as f:
            gt = json.load(f)
    name = f"'{where}'" if where else "the ground-truth json"
    missing = [k for k in ("images", "annotations", "categories") if k not in gt]
    if missing:
        raise EvaluationInputError(
            f"{name} lacks top-level key(s) {missing}; is it an LVIS/COCO json?"
        )
    no_freq = [c.get("id") for c in gt["categories"] if c.get("frequency") not in ("r", "c", "f")]
    if no_freq:
        raise EvaluationInputError(
            f"{name}: {len(no_freq)} categories have no valid 'frequency' (r/c/f) (ids "
            f"{_first(no_freq)}); APr/APc/APf need it. Fix: add it from the TRAINING image "
            "counts with `python -m fasa_seesaw.data.add_frequency VAL.json OUT.json "
            "--counts-from TRAIN.json`."
        )
    no_lists = [
        img.get("id")
        for img in gt["images"]
        if "neg_category_ids" not in img or "not_exhaustive_category_ids" not in img
    ]
    if no_lists:
        raise EvaluationInputError(
            f"{name}: {len(no_lists)} images lack 'neg_category_ids' / "
            f"'not_exhaustive_category_ids' (ids {_first(no_lists)}), the federated lists LVIS AP "
            "reads; train_net.py refuses this json too. Fix: add them with `python -m "
            "fasa_seesaw.data.add_frequency GT.json OUT.json` (empty lists where unknown: "
            "detections of a category absent from an image are then ignored, not counted)."
        )
    return gt


def load_results(path: Union[str, os.PathLike]) -> List[dict]:
    """A results json (a list of detections), with a clear error if it is missing or malformed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EvaluationInputError(f"results file '{path}' does not exist.")
    with open(path, encoding="utf-8") as f:
        try:
            results = json.load(f)
        except json.JSONDecodeError as e:
            raise EvaluationInputError(f"results file '{path}' is not valid json: {e}") from None
    if not isinstance(results, list):
        raise EvaluationInputError(
            f"results file '{path}' must hold a json list of detections "
            "({image_id, category_id, score, bbox and/or segmentation}); it holds a "
            f"{type(results).__name__}."
        )
    return results


def _first(xs, n=5):
    xs = list(xs)
    return ", ".join(map(str, xs[:n])) + (f", ... ({len(xs)} in all)" if len(xs) > n else "")


def prepare_results(
    gt: dict,
    results: Union[List[dict], str, os.PathLike],
    iou_type: str,
    img_ids: Optional[Sequence[int]] = None,
) -> List[dict]:
    """
    Check detections against the ground truth and return shallow copies ready for evaluation
    (segm results without ``bbox``). Nothing is capped here (see
    :func:`~fasa_seesaw.evaluation.caps.cap_per_image`).

    Raises:
        EmptyResultsError: no detections (on ``img_ids`` when given).
        EvaluationInputError: anything else that would make the evaluation wrong or crash deep
            inside a library: unknown ids, non-finite scores, missing fields, the wrong kind of
            results for ``iou_type``.
    """
    if iou_type not in ("bbox", "segm"):
        raise EvaluationInputError(f"iou_type must be 'bbox' or 'segm', not {iou_type!r}.")
    if isinstance(results, np.ndarray):
        return _prepare_array(gt, results, iou_type, img_ids)
    if not isinstance(results, list):
        results = load_results(results)
    if iou_type == "bbox":
        arr = _bbox_array(results)
        if arr is not None:  # well-formed box results: the compact array path
            return _prepare_array(gt, arr, iou_type, img_ids)
    if img_ids is not None:
        keep = {int(i) for i in img_ids}
        results = [r for r in results if r.get("image_id") in keep]
    if not results:
        raise EmptyResultsError(
            "there are no detections to evaluate (the results are empty"
            + (" on the selected images" if img_ids is not None else "")
            + "). Check that the model produced predictions (e.g. its score threshold, "
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST) and that the results belong to this dataset."
        )

    need = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
    missing = [
        i for i, r in enumerate(results) if not isinstance(r, dict) or any(k not in r for k in need)
    ]
    if missing:
        r0 = results[missing[0]]
        keys = sorted(r0) if isinstance(r0, dict) else type(r0).__name__
        if iou_type == "bbox" and isinstance(r0, dict) and "segmentation" in r0:
            hint = (
                "These look like mask results without boxes: evaluate them as segm "
                "(--iou-type segm), or write results with a 'bbox' too."
            )
        elif iou_type == "segm" and isinstance(r0, dict) and "bbox" in r0:
            hint = (
                "These look like box results: evaluate them as bbox (--iou-type bbox); mask "
                "AP needs an RLE 'segmentation' per detection."
            )
        else:
            hint = f"Every detection needs {', '.join(need)}."
        raise EvaluationInputError(
            f"{len(missing)} of {len(results)} detections lack a field needed for {iou_type} "
            f"evaluation (first: index {missing[0]}, keys {keys}). {hint}"
        )

    for i, r in enumerate(results):
        problem = _malformed(r, iou_type)
        if problem:
            count = sum(1 for r in results if _malformed(r, iou_type))
            raise EvaluationInputError(
                f"{count} of {len(results)} detections are malformed (first: index {i}, "
                f"{problem}). Each needs a numeric 'score', integer 'image_id' and "
                "'category_id', and for bbox evaluation a 'bbox' of 4 numbers [x, y, width, "
                "height]."
            )
    scores = np.array([r["score"] for r in results], dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise EvaluationInputError(
            f"{bad.size} detections have a non-finite score (NaN or inf; first at index "
            f"{int(bad[0])}: {results[int(bad[0])]['score']}). A diverged model produces these: "
            "check the training loss, or drop those detections before evaluating."
        )

    for field, known, hint in (
        (
            "image_id",
            {img["id"] for img in gt["images"]},
            "Were they produced on another split? Evaluate them against the json they were "
            "predicted on.",
        ),
        (
            "category_id",
            {c["id"] for c in gt["categories"]},
            "LVIS category ids are the json's ids (1-based); detectron2 models predict 0-based "
            "contiguous ids that the evaluator maps back.",
        ),
    ):
        unknown = sorted({r[field] for r in results} - known)
        if unknown:
            what = field.replace("_id", "")
            raise EvaluationInputError(
                f"the results name {len(unknown)} {what} ids that are not in the ground truth "
                f"({_first(unknown)}). {hint}"
            )

    out = []
    for r in results:
        r = dict(r)
        if iou_type == "segm":
            seg = r["segmentation"]
            if not (isinstance(seg, dict) and "counts" in seg and "size" in seg):
                raise EvaluationInputError(
                    "segm results need RLE masks ({'size': [h, w], 'counts': ...}), as detectron2 "
                    f"writes them; got a {type(seg).__name__}. Encode masks with "
                    "pycocotools.mask.encode."
                )
            r.pop("bbox", None)  # mask area for small/medium/large, as detectron2 does
        out.append(r)
    return out


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _malformed(r: dict, iou_type: str) -> Optional[str]:
    """What is wrong with one detection's fields, or None."""
    if not _is_number(r["score"]):
        return f"score {r['score']!r} is not a number"
    for key in ("image_id", "category_id"):
        if not isinstance(r[key], (int, np.integer)) or isinstance(r[key], bool):
            return f"{key} {r[key]!r} is not an integer"
    box = r.get("bbox") if iou_type == "bbox" else None
    if iou_type == "bbox" and not (
        isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(x) for x in box)
    ):
        return f"bbox {box!r} is not 4 numbers"
    return None


def _bbox_array(results: List[dict]) -> Optional[np.ndarray]:
    """Box results as an (N, 7) array, or None when some result is malformed (the caller's
    per-result checks then say which)."""
    if not results:
        return None
    try:
        cols = [
            np.array([r[k] for r in results]) for k in ("image_id", "bbox", "score", "category_id")
        ]
    except (KeyError, TypeError, ValueError):
        return None
    # Numbers only (a score or box given as strings would parse): anything else is reported by
    # the per-result checks.
    if any(c.dtype.kind not in "iuf" for c in cols) or cols[0].dtype.kind not in "iu":
        return None
    if cols[1].ndim != 2 or cols[1].shape[1] != 4:
        return None
    cols = [c.astype(np.float64) for c in cols]
    return np.concatenate([cols[0][:, None], cols[1], cols[2][:, None], cols[3][:, None]], 1)


ARRAY_COLUMNS = ("image_id", "x", "y", "w", "h", "score", "category_id")


def _prepare_array(gt, arr, iou_type, img_ids):
    """Box results as an (N, 7) array [image_id, x, y, w, h, score, category_id] (hotcoco's
    ``load_res`` layout): a few bytes per detection instead of a Python dict each."""
    if iou_type != "bbox":
        raise EvaluationInputError(
            "array results hold boxes only; segm evaluation needs a list of dicts with RLE "
            "'segmentation'."
        )
    if arr.ndim != 2 or arr.shape[1] != 7:
        raise EvaluationInputError(
            f"array results must have shape (N, 7) with columns {ARRAY_COLUMNS}; got "
            f"{arr.shape}."
        )
    arr = np.asarray(arr, dtype=np.float64)
    if img_ids is not None:
        arr = arr[np.isin(arr[:, 0], np.asarray(list(img_ids), dtype=np.float64))]
    if arr.shape[0] == 0:
        raise EmptyResultsError("there are no detections to evaluate (the results are empty).")
    bad = np.flatnonzero(~np.isfinite(arr[:, 5]))
    if bad.size:
        raise EvaluationInputError(
            f"{bad.size} detections have a non-finite score (NaN or inf; first at index "
            f"{int(bad[0])}: {arr[int(bad[0]), 5]}). A diverged model produces these: check the "
            "training loss, or drop those detections before evaluating."
        )
    bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
    if bad.size:
        raise EvaluationInputError(
            f"{bad.size} detections have a non-finite box or id (first at index {int(bad[0])}). "
            "Drop or repair them before evaluating."
        )
    for col, key, what in ((0, "images", "image ids"), (6, "categories", "category ids")):
        known = np.array(sorted(x["id"] for x in gt[key]), dtype=np.float64)
        unknown = np.unique(arr[~np.isin(arr[:, col], known), col])
        if unknown.size:
            raise EvaluationInputError(
                f"the results name {unknown.size} {what} that are not in the ground truth "
                f"({_first(unknown.astype(np.int64).tolist())})."
            )
    return arr
