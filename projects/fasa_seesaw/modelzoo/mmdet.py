# Copyright (c) fasa_seesaw contributors.
"""
mmdetection 2.x / 3.x Mask R-CNN and Cascade Mask R-CNN state dicts (Seesaw or CE heads, FCN or
normed mask heads) and the FASA release's (mmdetection 2.14, with its feature bank and draw
probabilities) mapped onto this project's detectron2 models.

Every mmdetection key has exactly one rule below or is dropped by name (BatchNorm's
``num_batches_tracked``, which detectron2's frozen BatchNorm does not keep). The conversion
fails, naming the keys, when a key has no rule, when the model has a key nothing maps to, or
when a shape differs. Layouts that already agree, and are copied as they are:

- ResNet "pytorch" style (the stride in the 3x3 conv: RESNETS.STRIDE_IN_1X1 False), conv1
  expecting RGB input;
- anchors: 3 per position in the same order (aspect ratios 0.5, 1, 2), so the RPN's
  objectness and delta channels line up;
- box deltas (dx, dy, dw, dh) per class, class-specific regression over the C foreground
  classes, the background logit last; Seesaw's C + 2 logits are [classes, foreground,
  background] in both;
- box-head fully-connected layers flatten the RoI features in the same (C, H, W) order.
"""

import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple
import torch

from ..errors import ConfigError

__all__ = [
    "ConversionError",
    "mmdet_key_to_detectron2",
    "convert_state_dict",
    "checkpoint_classes",
    "check_class_order",
    "LVIS_V1_SPELLINGS",
    "lvis_v1_names",
]


class ConversionError(ConfigError):
    """A checkpoint that does not map onto the model the config builds; the message says which
    keys and what to change."""


_BN = r"(weight|bias|running_mean|running_var)"
_WB = r"(weight|bias)"
# An optional cascade stage index after bbox_head / mask_head.
_STAGE = r"(?:\.(\d))?"


def _stage(m: re.Match, group: int) -> str:
    return "" if m.group(group) is None else f".{m.group(group)}"


def _counts(value: torch.Tensor, num_classes: int) -> torch.Tensor:
    # mmdetection's SeesawLoss.cum_samples: float, C + 1 (background last); ours: int64, C.
    return value[:num_classes].round().to(torch.long)


# (pattern, target) with target a format function of the match; None drops the key.
_Rule = Tuple[str, Optional[Callable[[re.Match], str]]]
RULES: List[_Rule] = [
    (r"backbone\.conv1\.weight", lambda m: "backbone.bottom_up.stem.conv1.weight"),
    (rf"backbone\.bn1\.{_BN}", lambda m: f"backbone.bottom_up.stem.conv1.norm.{m[1]}"),
    (
        r"backbone\.layer(\d)\.(\d+)\.conv(\d)\.weight",
        lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight",
    ),
    (
        rf"backbone\.layer(\d)\.(\d+)\.bn(\d)\.{_BN}",
        lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}",
    ),
    (
        r"backbone\.layer(\d)\.(\d+)\.downsample\.0\.weight",
        lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.weight",
    ),
    (
        rf"backbone\.layer(\d)\.(\d+)\.downsample\.1\.{_BN}",
        lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}",
    ),
    (r"backbone\..*num_batches_tracked", None),
    # The FASA release's last adaptation baseline (per-class validation loss / all RoIs), a
    # Parameter once its first pass has run: the adaptation hook keeps its own baseline.
    (rf"roi_head\.bbox_head{_STAGE}\.cum_loss_perclass_t1", None),
    (
        rf"neck\.lateral_convs\.(\d)\.conv\.{_WB}",
        lambda m: f"backbone.fpn_lateral{int(m[1]) + 2}.{m[2]}",
    ),
    (
        rf"neck\.fpn_convs\.(\d)\.conv\.{_WB}",
        lambda m: f"backbone.fpn_output{int(m[1]) + 2}.{m[2]}",
    ),
    (rf"rpn_head\.rpn_conv\.{_WB}", lambda m: f"proposal_generator.rpn_head.conv.{m[1]}"),
    (
        rf"rpn_head\.rpn_cls\.{_WB}",
        lambda m: f"proposal_generator.rpn_head.objectness_logits.{m[1]}",
    ),
    (rf"rpn_head\.rpn_reg\.{_WB}", lambda m: f"proposal_generator.rpn_head.anchor_deltas.{m[1]}"),
    (
        rf"roi_head\.bbox_head{_STAGE}\.shared_fcs\.(\d)\.{_WB}",
        lambda m: f"roi_heads.box_head{_stage(m, 1)}.fc{int(m[2]) + 1}.{m[3]}",
    ),
    (
        rf"roi_head\.bbox_head{_STAGE}\.fc_cls\.{_WB}",
        lambda m: f"roi_heads.box_predictor{_stage(m, 1)}.cls_score.{m[2]}",
    ),
    (
        rf"roi_head\.bbox_head{_STAGE}\.fc_reg\.{_WB}",
        lambda m: f"roi_heads.box_predictor{_stage(m, 1)}.bbox_pred.{m[2]}",
    ),
    (
        rf"roi_head\.bbox_head{_STAGE}\.loss_cls\.cum_samples",
        lambda m: f"roi_heads.box_predictor{_stage(m, 1)}.cls_loss.class_counts",
    ),
    # The FASA release's bank (feature_std holds the variance: its generator takes the sqrt)
    # and draw probabilities.
    (
        rf"roi_head\.bbox_head{_STAGE}\.feature_mean",
        lambda m: f"roi_heads.box_predictor{_stage(m, 1)}.fasa.bank.mean",
    ),
    (
        rf"roi_head\.bbox_head{_STAGE}\.feature_std",
        lambda m: f"roi_heads.box_predictor{_stage(m, 1)}.fasa.bank.var",
    ),
    (
        rf"roi_head\.bbox_head{_STAGE}\.feature_used",
        lambda m: f"roi_heads.box_predictor{_stage(m, 1)}.fasa.bank.count",
    ),
    (
        rf"roi_head\.bbox_head{_STAGE}\.prob_list",
        lambda m: f"roi_heads.box_predictor{_stage(m, 1)}.fasa.probs",
    ),
    (
        rf"roi_head\.mask_head{_STAGE}\.convs\.(\d)\.conv\.{_WB}",
        lambda m: f"roi_heads.mask_head{_stage(m, 1)}.mask_fcn{int(m[2]) + 1}.{m[3]}",
    ),
    (
        rf"roi_head\.mask_head{_STAGE}\.upsample\.{_WB}",
        lambda m: f"roi_heads.mask_head{_stage(m, 1)}.deconv.{m[2]}",
    ),
    (
        rf"roi_head\.mask_head{_STAGE}\.conv_logits\.{_WB}",
        lambda m: f"roi_heads.mask_head{_stage(m, 1)}.predictor.{m[2]}",
    ),
]
_COMPILED = [(re.compile(p + r"$"), t) for p, t in RULES]

# What a key that has no rule usually means, for the error message.
_UNMAPPED_HINTS = [
    ("semantic_head", "HTC's semantic branch has no counterpart here"),
    ("mask_head.", "a mask head this project does not build (HTC's interleaved heads?)"),
    ("backbone.layer", "a backbone other than ResNet with BatchNorm (e.g. DCN or GN)"),
    ("neck.", "a neck other than FPN without extra convs"),
]


def mmdet_key_to_detectron2(key: str) -> Tuple[bool, Optional[str]]:
    """(known, target): known False when no rule matches; target None for a dropped key."""
    for pattern, target in _COMPILED:
        m = pattern.match(key)
        if m:
            return True, (target(m) if target else None)
    return False, None


def _strip_prefix(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # Checkpoints saved from a DistributedDataParallel wrapper carry "module.".
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def _listing(keys: Sequence[str], limit: int = 10) -> str:
    shown = "\n".join(f"    {k}" for k in list(keys)[:limit])
    more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return shown + more


def convert_state_dict(
    mm_state: Dict[str, torch.Tensor],
    model_state: Dict[str, torch.Tensor],
    *,
    optional: Sequence[str] = (),
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """
    Map ``mm_state`` (an mmdetection ``state_dict``) onto the keys, shapes and dtypes of
    ``model_state`` (the target model's ``state_dict()``).

    Args:
        optional: model keys the checkpoint may lack (training-only state such as FASA's bank
            or Seesaw's class counts): they keep the model's value and are listed in the notes.

    Returns:
        (state, notes): a complete state dict for the model, and what the conversion did
        beyond copying (dropped keys, filled or derived state).

    Raises:
        ConversionError naming every unmapped, unfilled or mismatched key.
    """
    mm_state = _strip_prefix(mm_state)
    out: Dict[str, torch.Tensor] = {}
    unknown, unused, shapes, dropped, notes = [], [], [], [], []
    for key, value in mm_state.items():
        known, target = mmdet_key_to_detectron2(key)
        if not known:
            unknown.append(key)
            continue
        if target is None:
            dropped.append(key)
            continue
        if target not in model_state:
            unused.append(f"{key} -> {target}")
            continue
        ref = model_state[target]
        if target.endswith("cls_loss.class_counts"):
            value = _counts(value, ref.numel())
        elif target.endswith("fasa.bank.count"):
            value = value.round().to(ref.dtype)
        if tuple(value.shape) != tuple(ref.shape):
            shapes.append(f"{key} {tuple(value.shape)} -> {target} {tuple(ref.shape)}")
            continue
        out[target] = value.detach().to(dtype=ref.dtype).clone()
    # FASA's probabilities count as set once they come from a checkpoint.
    for target in list(out):
        if target.endswith("fasa.probs"):
            flag = target[: -len("probs")] + "probs_initialized"
            if flag in model_state:
                out[flag] = torch.ones_like(model_state[flag])
    missing = [k for k in model_state if k not in out and k not in optional]
    problems = []
    if unknown:
        hints = sorted({h for k in unknown for p, h in _UNMAPPED_HINTS if p in k})
        problems.append(
            f"{len(unknown)} checkpoint keys have no rule (an architecture this converter does "
            f"not know{': ' + '; '.join(hints) if hints else ''}):\n{_listing(unknown)}"
        )
    if unused:
        problems.append(
            f"{len(unused)} checkpoint keys map to nothing in the model the config builds (a "
            "cascade checkpoint with a single-stage config, per-stage mask heads with "
            "MODEL.ROI_BOX_CASCADE_HEAD.MASK_HEADS one, FASA state with MODEL.FASA.ENABLED "
            f"False, or Seesaw's counts with a CE config?):\n{_listing(unused)}"
        )
    if shapes:
        problems.append(
            f"{len(shapes)} tensors have another shape in the model (NUM_CLASSES, the loss: "
            "Seesaw's C + 2 logits or CE's C + 1, class-agnostic box regression, ResNet depth?):"
            f"\n{_listing(shapes)}"
        )
    if missing:
        problems.append(
            f"{len(missing)} model keys get no value from the checkpoint (a config with parts the "
            "checkpoint does not have: the normed mask head, a cascade, FASA?):\n"
            + _listing(missing)
        )
    if problems:
        raise ConversionError(
            "The checkpoint does not convert onto this config's model:\n"
            + "\n".join(problems)
            + "\nUse the config that matches the checkpoint "
            "(configs/LVISv1-InstanceSegmentation/mmdet_converted/)."
        )
    bn = [k for k in dropped if k.endswith("num_batches_tracked")]
    if bn:
        notes.append(f"dropped {len(bn)} BatchNorm num_batches_tracked counters")
    if len(dropped) > len(bn):
        notes.append(
            "dropped the FASA release's last adaptation baseline (cum_loss_perclass_t1): a run "
            "continued from these weights sets its own baseline at its first pass"
        )
    kept = [k for k in model_state if k not in out]
    for k in kept:
        out[k] = model_state[k].clone()
    if kept:
        notes.append(
            f"{len(kept)} training-state tensors the checkpoint does not have keep their "
            f"initial values: {', '.join(kept[:4])}{' ...' if len(kept) > 4 else ''}"
        )
    if any(k.endswith("fasa.bank.count") for k in out if k not in kept):
        notes.append(
            "FASA bank counts are the release's feature_used flags (1 for a seen class): right for "
            "MODEL.FASA.BANK_MODE ema; BANK_MODE exact would weigh the bank as one feature"
        )
    if any(k.endswith("cls_loss.class_counts") for k in out if k not in kept):
        notes.append("Seesaw class counts are the checkpoint's cum_samples without background")
    return out, notes


# The LVIS v1 json spells one category "speaker_(stero_equipment)"; mmdetection's class list
# corrects it. Checkpoint name -> LVIS v1 name.
LVIS_V1_SPELLINGS = {"speaker_(stereo_equipment)": "speaker_(stero_equipment)"}


def checkpoint_classes(checkpoint: dict) -> Optional[List[str]]:
    """The class names an mmdetection checkpoint was trained with (2.x ``meta.CLASSES``,
    3.x ``meta.dataset_meta.classes``), or None."""
    meta = checkpoint.get("meta") or {}
    classes = meta.get("CLASSES")
    if classes is None:
        classes = (meta.get("dataset_meta") or {}).get("classes")
    return None if classes is None else [str(c) for c in classes]


def check_class_order(classes: Sequence[str], expected: Sequence) -> None:
    """
    ConversionError unless ``classes`` (the checkpoint's, in output order) are the dataset's
    categories in contiguous-id order. ``expected[i]`` is output i's name, or the set of names
    that category goes by (LVIS: its name and synonyms; detectron2 names LVIS classes by their
    first synonym). The known spellings above are allowed.
    """
    got = [LVIS_V1_SPELLINGS.get(c, c) for c in classes]
    if len(got) != len(expected):
        raise ConversionError(
            f"The checkpoint was trained with {len(got)} classes, the dataset has "
            f"{len(expected)}; convert it with a config and dataset of the same classes."
        )
    names = [{e} if isinstance(e, str) else set(e) for e in expected]
    wrong = [(i, a, b) for i, (a, b) in enumerate(zip(got, names)) if a not in b]
    if wrong:
        shown = "; ".join(
            f"output {i}: checkpoint {a!r}, dataset {sorted(b)[0]!r}" for i, a, b in wrong[:5]
        )
        raise ConversionError(
            f"The checkpoint's class order differs from the dataset's at {len(wrong)} of "
            f"{len(got)} outputs ({shown}). Its classifier rows would score the wrong "
            "categories; convert it against the dataset it was trained on."
        )


def lvis_v1_names() -> List[set]:
    """Each LVIS v1 category's name and synonyms, in contiguous-id (sorted id) order."""
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    return [{c["name"], *c["synonyms"]} for c in sorted(LVIS_CATEGORIES, key=lambda c: c["id"])]
