# Copyright (c) fasa_seesaw contributors.
"""
NMS re-sampling (Wu et al., "Forest R-CNN", ACM MM 2020; FASA supplement section G): during
training the RPN's NMS keeps more proposals around rare objects and fewer around frequent ones,
with a threshold per frequency group of the ground truth a proposal covers (rare 0.9, common
0.8, frequent 0.7; a proposal on no object counts as frequent). At test the RPN is detectron2's.

Two rules (``MODEL.RPN.NMS_RESAMPLING.MODE``):

- "discrete", the official LVIS configs' (Forest R-CNN ``nms_resampling_discrete``): three NMS
  passes over all proposals at the rare, common and frequent thresholds; the rare pass keeps its
  survivors with IoU >= MATCH_IOU to some rare ground truth, the common pass those near a common
  one, the frequent pass those near neither. Their concatenation is the result (a proposal near
  both a rare and a common object is kept twice, as there).
- "matched" (Forest R-CNN's ``nms_resampling_linear`` rule with the group thresholds): each
  proposal takes the group of the ground truth it overlaps most (IoU >= MATCH_IOU, else frequent)
  and one greedy NMS runs in which a kept proposal suppresses the lower-scored ones whose IoU with
  it exceeds its own threshold.

The functions are plain torch; :class:`LongTailRPN` is detectron2's RPN with the rule in its
training-time proposal selection.
"""

from typing import Callable, List, Optional, Sequence, Tuple
import torch

from detectron2.config import configurable
from detectron2.layers import batched_nms, cat
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY, RPN
from detectron2.structures import Boxes, Instances, pairwise_iou

from ..errors import ConfigError, check_choice

__all__ = [
    "NMS_RESAMPLING_MODES",
    "LongTailRPN",
    "check_resampling_thresholds",
    "class_groups_from_frequency",
    "discrete_resampling_nms",
    "matched_resampling_nms",
    "proposal_groups",
    "threshold_nms",
]

NMS_RESAMPLING_MODES = ("discrete", "matched")
# Group ids, in the order of MODEL.RPN.NMS_RESAMPLING.THRESHOLDS.
RARE, COMMON, FREQUENT = 0, 1, 2


def check_resampling_thresholds(thresholds: Sequence[float]) -> Tuple[float, float, float]:
    """The (rare, common, frequent) thresholds, each in (0, 1]; anything else is a ConfigError."""
    values = list(thresholds)
    ok = len(values) == 3 and all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and 0.0 < t <= 1.0 for t in values
    )
    if not ok:
        raise ConfigError(
            f"MODEL.RPN.NMS_RESAMPLING.THRESHOLDS is {values!r}; it must be three IoU thresholds "
            "in (0, 1] for rare, common and frequent classes (Forest R-CNN: [0.9, 0.8, 0.7])."
        )
    return tuple(float(t) for t in values)


def class_groups_from_frequency(frequency: Sequence[str]) -> torch.Tensor:
    """Group id (rare 0, common 1, frequent 2) per class from LVIS's "r"/"c"/"f" letters."""
    ids = {"r": RARE, "c": COMMON, "f": FREQUENT}
    bad = sorted({f for f in frequency if f not in ids})
    if bad:
        raise ConfigError(
            f"NMS re-sampling needs each training class's LVIS frequency group ('r', 'c' or 'f'); "
            f"found {bad}. Register the dataset with 'frequency' fields or 'image_count's."
        )
    return torch.tensor([ids[f] for f in frequency], dtype=torch.long)


def proposal_groups(
    boxes: torch.Tensor, gt_boxes: torch.Tensor, gt_groups: torch.Tensor, match_iou: float
) -> torch.Tensor:
    """
    The group of the ground truth each proposal overlaps most, where that IoU is >= ``match_iou``;
    frequent otherwise (background, or an image without ground truth).
    """
    groups = torch.full((len(boxes),), FREQUENT, dtype=torch.long, device=boxes.device)
    if len(gt_boxes) == 0 or len(boxes) == 0:
        return groups
    iou = pairwise_iou(Boxes(boxes), Boxes(gt_boxes))  # (proposals, gt)
    best, idx = iou.max(dim=1)
    return torch.where(best >= match_iou, gt_groups[idx], groups)


def threshold_nms(boxes: torch.Tensor, scores: torch.Tensor, thresholds: torch.Tensor):
    """
    Greedy NMS in which each box has its own threshold: in descending score order a kept box
    suppresses every later box whose IoU with it is above the kept box's threshold. Returns the
    kept indices sorted by decreasing score, like torchvision's ``nms``.

    Computed without a loop over boxes (Cluster-NMS, Zheng et al. 2021): with S[i, j] = "i ranks
    above j and IoU > t_i", iterating keep_j = not any_i(keep_i and S[i, j]) from all-kept reaches
    exactly the greedy result (box k is final after k iterations at most).
    """
    order = torch.argsort(scores, descending=True, stable=True)
    if len(order) == 0:
        return order
    b = boxes[order]
    iou = pairwise_iou(Boxes(b), Boxes(b))
    ranked_above = torch.ones_like(iou, dtype=torch.bool).triu(diagonal=1)
    suppresses = (iou > thresholds[order][:, None]) & ranked_above
    keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    for _ in range(len(order)):
        new = ~(suppresses & keep[:, None]).any(dim=0)
        if torch.equal(new, keep):
            break
        keep = new
    return order[keep]


def matched_resampling_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    idxs: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_groups: torch.Tensor,
    thresholds: Sequence[float],
    match_iou: float,
) -> torch.Tensor:
    """The "matched" rule, run separately for each value of ``idxs`` (the FPN level, as
    detectron2's batched NMS). Returns kept indices sorted by decreasing score."""
    groups = proposal_groups(boxes, gt_boxes, gt_groups, match_iou)
    per_box = torch.as_tensor(thresholds, dtype=boxes.dtype, device=boxes.device)[groups]
    kept = []
    for level in torch.unique(idxs).tolist():
        members = torch.nonzero(idxs == level).squeeze(1)
        kept.append(members[threshold_nms(boxes[members], scores[members], per_box[members])])
    keep = cat(kept) if kept else idxs.new_zeros(0)
    return keep[torch.argsort(scores[keep], descending=True, stable=True)]


def discrete_resampling_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    idxs: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_groups: torch.Tensor,
    thresholds: Sequence[float],
    match_iou: float,
) -> torch.Tensor:
    """
    The "discrete" rule (the official LVIS configs'): the survivors of a rare-threshold NMS that
    overlap a rare ground truth (IoU >= ``match_iou``), those of a common-threshold NMS near a
    common one, and those of a frequent-threshold NMS near neither; concatenated (an index may
    appear twice), then sorted by decreasing score. NMS runs per value of ``idxs``.
    """
    t_rare, t_common, t_frequent = thresholds

    def near(keep, group):
        g = gt_boxes[gt_groups == group]
        if len(g) == 0 or len(keep) == 0:
            return torch.zeros(len(keep), dtype=torch.bool, device=boxes.device)
        return pairwise_iou(Boxes(g), Boxes(boxes[keep])).max(dim=0).values >= match_iou

    frequent = batched_nms(boxes, scores, idxs, t_frequent)
    out, far = [], torch.ones(len(frequent), dtype=torch.bool, device=boxes.device)
    for group, t in ((RARE, t_rare), (COMMON, t_common)):
        if not bool((gt_groups == group).any()):
            continue  # as the official code: no pass for a group absent from the image
        keep = batched_nms(boxes, scores, idxs, t)
        out.append(keep[near(keep, group)])
        far &= ~near(frequent, group)
    out.append(frequent[far])
    keep = cat(out)
    return keep[torch.argsort(scores[keep], descending=True, stable=True)]


_RULES = {"discrete": discrete_resampling_nms, "matched": matched_resampling_nms}


def select_proposals(
    proposals: List[torch.Tensor],
    pred_objectness_logits: List[torch.Tensor],
    image_sizes: List[Tuple[int, int]],
    pre_nms_topk: int,
    post_nms_topk: int,
    min_box_size: float,
    nms: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> List[Instances]:
    """
    detectron2's ``find_top_rpn_proposals`` in training (per-level top-k, finite check, clip,
    size filter, NMS per level, top ``post_nms_topk``) with its NMS replaced by
    ``nms(image_index, boxes, scores, level_ids) -> kept indices sorted by score``;
    ``tests/test_nms_resampling.py`` checks that with detectron2's NMS it returns detectron2's
    proposals.
    """
    num_images = len(image_sizes)
    device = proposals[0].device
    batch_idx = torch.arange(num_images, device=device)
    topk_scores, topk_proposals, level_ids = [], [], []
    for level_id, (proposals_i, logits_i) in enumerate(zip(proposals, pred_objectness_logits)):
        num_proposals_i = min(logits_i.shape[1], pre_nms_topk)
        topk_scores_i, topk_idx = logits_i.topk(num_proposals_i, dim=1)
        topk_proposals.append(proposals_i[batch_idx[:, None], topk_idx])
        topk_scores.append(topk_scores_i)
        level_ids.append(torch.full((num_proposals_i,), level_id, dtype=torch.int64, device=device))
    topk_scores, topk_proposals, level_ids = (
        cat(topk_scores, dim=1),
        cat(topk_proposals, dim=1),
        cat(level_ids, dim=0),
    )
    results = []
    for n, image_size in enumerate(image_sizes):
        boxes, scores, lvl = Boxes(topk_proposals[n]), topk_scores[n], level_ids
        if not (torch.isfinite(boxes.tensor).all() and torch.isfinite(scores).all()):
            raise FloatingPointError(
                "Predicted boxes or scores contain Inf/NaN. Training has diverged."
            )
        boxes.clip(image_size)
        keep = boxes.nonempty(threshold=min_box_size)
        if keep.sum().item() != len(boxes):
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
        keep = nms(n, boxes.tensor, scores, lvl)[:post_nms_topk]
        res = Instances(image_size)
        res.proposal_boxes = boxes[keep]
        res.objectness_logits = scores[keep]
        results.append(res)
    return results


@PROPOSAL_GENERATOR_REGISTRY.register()
class LongTailRPN(RPN):
    """
    detectron2's RPN with NMS re-sampling in training (MODEL.RPN.NMS_RESAMPLING); with it off,
    or at test, it is detectron2's RPN. The class groups (rare / common / frequent per class) come
    from ``class_groups()`` on the first training step, so building the model for evaluation
    reads no training data.
    """

    @configurable
    def __init__(
        self,
        *,
        nms_resampling: bool = False,
        resampling_mode: str = "discrete",
        resampling_thresholds: Sequence[float] = (0.9, 0.8, 0.7),
        resampling_match_iou: float = 0.3,
        class_groups: Optional[Callable[[], torch.Tensor]] = None,
        **kwargs,
    ):
        """
        Args:
            nms_resampling: use NMS re-sampling in training.
            resampling_mode: "discrete" or "matched" (see the module docstring).
            resampling_thresholds: NMS IoU thresholds for rare, common and frequent.
            resampling_match_iou: IoU with a ground truth at which a proposal belongs to its group.
            class_groups: returns the group id (0 rare, 1 common, 2 frequent) of every class.
            kwargs: as in detectron2's RPN.
        """
        super().__init__(**kwargs)
        check_choice("MODEL.RPN.NMS_RESAMPLING.MODE", resampling_mode, NMS_RESAMPLING_MODES)
        self.nms_resampling = bool(nms_resampling)
        self.resampling_mode = resampling_mode
        self.resampling_thresholds = check_resampling_thresholds(resampling_thresholds)
        if not 0.0 <= resampling_match_iou <= 1.0:
            raise ConfigError(
                f"MODEL.RPN.NMS_RESAMPLING.MATCH_IOU is {resampling_match_iou!r}; it must lie in "
                "[0, 1] (Forest R-CNN: 0.3)."
            )
        self.resampling_match_iou = float(resampling_match_iou)
        if self.nms_resampling and class_groups is None:
            raise ConfigError("NMS re-sampling needs the classes' frequency groups; none given.")
        self._class_groups_fn = class_groups
        self._class_groups: Optional[torch.Tensor] = None
        self._gt_instances: Optional[List[Instances]] = None

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        c = cfg.MODEL.RPN.NMS_RESAMPLING
        ret.update(
            nms_resampling=c.ENABLED,
            resampling_mode=c.MODE,
            resampling_thresholds=list(c.THRESHOLDS),
            resampling_match_iou=c.MATCH_IOU,
        )
        if c.ENABLED:
            names = tuple(cfg.DATASETS.TRAIN)
            num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
            ret["class_groups"] = lambda: _training_class_groups(names, num_classes)
        return ret

    @property
    def class_groups(self) -> torch.Tensor:
        """Group id (0 rare, 1 common, 2 frequent) of every class, read on first use."""
        if self._class_groups is None:
            self._class_groups = self._class_groups_fn()
        return self._class_groups

    @class_groups.setter
    def class_groups(self, groups: torch.Tensor) -> None:
        self._class_groups = torch.as_tensor(groups, dtype=torch.long)

    def forward(self, images, features, gt_instances=None):
        self._gt_instances = gt_instances if self.training and self.nms_resampling else None
        try:
            return super().forward(images, features, gt_instances)
        finally:
            self._gt_instances = None

    @torch.no_grad()
    def predict_proposals(self, anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes):
        gts = self._gt_instances
        if gts is None:
            return super().predict_proposals(
                anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes
            )
        groups_of_class = self.class_groups
        rule = _RULES[self.resampling_mode]

        def nms(n, boxes, scores, lvl):
            gt = gts[n]
            gt_groups = groups_of_class.to(boxes.device)[gt.gt_classes]
            return rule(
                boxes,
                scores,
                lvl,
                gt.gt_boxes.tensor,
                gt_groups,
                self.resampling_thresholds,
                self.resampling_match_iou,
            )

        return select_proposals(
            self._decode_proposals(anchors, pred_anchor_deltas),
            pred_objectness_logits,
            image_sizes,
            self.pre_nms_topk[True],
            self.post_nms_topk[True],
            self.min_box_size,
            nms,
        )

    def extra_repr(self):
        if not self.nms_resampling:
            return ""
        return (
            f"nms_resampling={self.resampling_mode}, thresholds={self.resampling_thresholds}, "
            f"match_iou={self.resampling_match_iou}"
        )


def _training_class_groups(dataset_names, num_classes: int) -> torch.Tensor:
    from ..data.counts import class_frequency

    return class_groups_from_frequency(class_frequency(dataset_names, num_classes).tolist())
