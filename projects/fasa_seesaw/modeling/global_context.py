# Copyright (c) fasa_seesaw contributors.
"""
HTC-Lite's global context encoder (Seesaw supplement 4.1): convolutions and a global average
pool over a pyramid feature give one vector per image; a fully-connected layer on it predicts
which categories the image holds, trained with binary cross-entropy; the vector is added to
every RoI feature the box heads and the mask head pool (:class:`LongTailCascadeROIHeads`).

Where the paper is silent the architecture is mmdetection's ``GlobalContextHead`` as SCNet
configures it: the coarsest pyramid level (its ``feats[-1]``: P6 of a 5-level FPN), four 3x3
convolutions grouped two by two into residual blocks (``SimplifiedBasicBlock``: conv, ReLU,
conv, plus the input; no norm, convolutions with bias; PyTorch's default initialisation),
256 channels, the classifier initialised N(0, 0.01) with zero bias, loss weight 3.0.

The targets follow LVIS's federated labels by default (``TARGET "federated"``): an image's
ground-truth categories are positives, its ``neg_category_ids`` are negatives, and every other
category is left out of the loss, whose mean runs over the labelled entries only (mmdetection's
runs over all N x C entries, so the same loss weight weighs each labelled entry more here).
The vector is pooled over the whole padded feature map, as mmdetection's: with images of
different sizes in a batch, an image's vector depends on the padding. mmdetection's
rule (``"exhaustive"``: every category without a box is a negative, mean over all entries) is
right for exhaustively labelled data such as COCO, but on LVIS it would teach the encoder that
the unlabelled categories are absent.
"""

from typing import Dict, List, Optional, Sequence
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

from ..errors import ConfigError

__all__ = [
    "GlobalContextHead",
    "GlobalContextRCNN",
    "CONTEXT_NORMS",
    "CONTEXT_TARGETS",
    "context_targets",
    "image_negatives",
]

CONTEXT_TARGETS = ("federated", "exhaustive")
# detectron2's get_norm names for 2D feature maps, and "" for none.
CONTEXT_NORMS = (
    "",
    "BN",
    "SyncBN",
    "FrozenBN",
    "GN",
    "nnSyncBN",
    "naiveSyncBN",
    "naiveSyncBN_N",
    "LN",
)


class _ResidualBlock(nn.Module):
    """mmdetection's SimplifiedBasicBlock: conv3x3, (norm), ReLU, conv3x3, (norm), plus the input
    (through a 1x1 projection when the channel count changes); no ReLU at the end."""

    def __init__(self, in_channels: int, channels: int, norm: str = ""):
        super().__init__()
        bias = not norm
        self.conv1 = Conv2d(
            in_channels, channels, 3, padding=1, bias=bias, norm=get_norm(norm, channels)
        )
        self.conv2 = Conv2d(
            channels, channels, 3, padding=1, bias=bias, norm=get_norm(norm, channels)
        )
        self.shortcut = (
            None
            if in_channels == channels
            else Conv2d(in_channels, channels, 1, bias=bias, norm=get_norm(norm, channels))
        )

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.conv2(F.relu(self.conv1(x))) + identity


class GlobalContextHead(nn.Module):
    """
    The context encoder: ``forward(features)`` returns ``(logits, context)``, the multi-label
    logits (N, num_classes) and the context vector projected to the RoI features' channel count
    (N, roi_channels), ready to be added to every RoI feature of its image.
    """

    def __init__(
        self,
        *,
        in_features: Sequence[str],
        in_channels: int,
        num_classes: int,
        roi_channels: int,
        num_convs: int = 4,
        conv_dim: int = 256,
        residual: bool = True,
        norm: str = "",
        loss_weight: float = 3.0,
        target: str = "federated",
    ):
        super().__init__()
        self.in_features = list(in_features)
        self.num_classes = num_classes
        self.loss_weight = float(loss_weight)
        self.target = target
        layers: List[nn.Module] = []
        channels = in_channels
        if residual:
            # mmdetection's conv_to_res: two convolutions per residual block.
            for _ in range(num_convs // 2):
                layers.append(_ResidualBlock(channels, conv_dim, norm))
                channels = conv_dim
        else:
            for _ in range(num_convs):
                layers.append(
                    Conv2d(
                        channels,
                        conv_dim,
                        3,
                        padding=1,
                        bias=not norm,
                        norm=get_norm(norm, conv_dim),
                        activation=F.relu,
                    )
                )
                channels = conv_dim
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.constant_(self.fc.bias, 0.0)
        # The vector is added to the RoI features; when its width differs from theirs, a linear
        # projection (this project's choice) maps it; with equal widths (mmdetection's 256 and
        # 256) there is none.
        self.project = None if channels == roi_channels else nn.Linear(channels, roi_channels)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec], roi_channels: int):
        c = cfg.MODEL.GLOBAL_CONTEXT
        levels = list(c.IN_FEATURES)
        if not levels:
            raise ConfigError(
                "MODEL.GLOBAL_CONTEXT.IN_FEATURES is empty: name the pyramid level(s) the context "
                f"encoder reads (mmdetection reads the coarsest, here 'p6'; the backbone gives "
                f"{sorted(input_shape)})."
            )
        unknown = [f for f in levels if f not in input_shape]
        if unknown:
            raise ConfigError(
                f"MODEL.GLOBAL_CONTEXT.IN_FEATURES names {unknown}, which the backbone does not "
                f"output; choose from {sorted(input_shape)} (mmdetection reads the coarsest, "
                "'p6' of an FPN)."
            )
        channels = {input_shape[f].channels for f in levels}
        if len(channels) != 1:
            raise ConfigError(
                f"MODEL.GLOBAL_CONTEXT.IN_FEATURES {levels} have different channel counts "
                f"{sorted(channels)}; name levels of one width."
            )
        return cls(
            in_features=levels,
            in_channels=channels.pop(),
            num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            roi_channels=roi_channels,
            num_convs=c.NUM_CONVS,
            conv_dim=c.CONV_DIM,
            residual=c.RESIDUAL,
            norm=c.NORM,
            loss_weight=c.LOSS_WEIGHT,
            target=c.TARGET,
        )

    def forward(self, features: Dict[str, torch.Tensor]):
        # One vector per level (the convolutions are shared), averaged over the levels.
        pooled = [self.convs(features[f]).mean(dim=(2, 3)) for f in self.in_features]
        vector = pooled[0] if len(pooled) == 1 else torch.stack(pooled).mean(dim=0)
        logits = self.fc(vector)
        context = vector if self.project is None else self.project(vector)
        return logits, context

    def losses(self, logits, gt_classes: List[torch.Tensor], negatives: Optional[list]):
        """``{"loss_global_context": ...}`` for the images' ground-truth classes and (federated
        targets) their verified-negative classes."""
        targets, weights = context_targets(
            gt_classes, negatives, self.num_classes, self.target, device=logits.device
        )
        bce = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
        if weights is None:  # exhaustive: mmdetection's mean over every entry
            loss = bce.mean()
        else:
            loss = (bce * weights).sum() / weights.sum().clamp(min=1.0)
        return {"loss_global_context": self.loss_weight * loss}


def context_targets(gt_classes, negatives, num_classes: int, target: str, device=None):
    """
    (targets, weights) of shape (N, num_classes): 1 for the categories with a ground-truth box.
    ``"federated"``: weights 1 on those and on the image's negatives (``negatives[i]``, contiguous
    ids), 0 elsewhere; ``"exhaustive"``: weights None (every entry counts, absent ones are 0).
    """
    n = len(gt_classes)
    targets = torch.zeros((n, num_classes), dtype=torch.float32, device=device)
    for i, classes in enumerate(gt_classes):
        targets[i, classes.long().to(targets.device)] = 1.0
    if target == "exhaustive":
        return targets, None
    if negatives is None:
        raise ConfigError(
            "MODEL.GLOBAL_CONTEXT.TARGET 'federated' needs each training image's negative "
            "categories: set MODEL.META_ARCHITECTURE 'GlobalContextRCNN' (it passes the "
            "images' neg_category_ids), or TARGET 'exhaustive' for exhaustively labelled data."
        )
    weights = targets.clone()
    for i, neg in enumerate(negatives):
        if len(neg):
            weights[i, torch.as_tensor(neg, dtype=torch.long, device=weights.device)] = 1.0
    return targets, weights


def image_negatives(batched_inputs, num_classes: int):
    """Each image's verified-negative categories as contiguous ids (LVIS ``neg_category_ids``,
    1-based, minus 1, as detectron2's LVIS loader maps the boxes' category ids)."""
    out = []
    for x in batched_inputs:
        if "neg_category_ids" not in x:
            raise ConfigError(
                f"Training image {x.get('file_name', x.get('image_id'))!r} has no "
                "'neg_category_ids': federated context targets (MODEL.GLOBAL_CONTEXT.TARGET) "
                "need LVIS-format data. Register the dataset from an LVIS json, or set "
                "MODEL.GLOBAL_CONTEXT.TARGET 'exhaustive'."
            )
        ids = [int(c) - 1 for c in x["neg_category_ids"]]
        bad = [c + 1 for c in ids if not 0 <= c < num_classes]
        if bad:
            raise ConfigError(
                f"Training image {x.get('file_name', x.get('image_id'))!r} lists "
                f"neg_category_ids {bad[:5]} outside 1..{num_classes} "
                "(MODEL.ROI_HEADS.NUM_CLASSES)."
            )
        out.append(ids)
    return out


@META_ARCH_REGISTRY.register()
class GlobalContextRCNN(GeneralizedRCNN):
    """
    detectron2's GeneralizedRCNN that, in training, hands each image's verified-negative
    categories (LVIS ``neg_category_ids``) to the ROI heads' global context encoder for its
    federated targets. Otherwise the same model: same modules, same checkpoints, same inference.
    """

    def forward(self, batched_inputs):
        context = getattr(self.roi_heads, "global_context", None)
        if not (
            self.training
            and context is not None
            and context.target == "federated"
            and any(p.requires_grad for p in context.parameters())  # (frozen: no loss)
        ):
            return super().forward(batched_inputs)
        self.roi_heads.image_negatives = image_negatives(batched_inputs, context.num_classes)
        try:
            return super().forward(batched_inputs)
        finally:
            self.roi_heads.image_negatives = None
