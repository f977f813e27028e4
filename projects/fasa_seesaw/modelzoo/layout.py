# Copyright (c) fasa_seesaw contributors.
"""
State dicts laid out as mmdetection's modules lay them out (key names and shapes), with random
values: the converter's tests use them without mmdetection installed, and
tools/mmdet_equality.py checks them against mmdetection's real models. Written from
mmdetection's sources: ResNet (mmdet/models/backbones/resnet.py, Bottleneck with
downsample = [conv, BN] in each layer's first block), FPN (ConvModule: ``.conv``), RPNHead
(rpn_conv, rpn_cls with one sigmoid logit per anchor, rpn_reg), Shared2FCBBoxHead
(shared_fcs, fc_cls, fc_reg), SeesawLoss (buffer ``cum_samples``, C + 1), FCNMaskHead
(convs, upsample, conv_logits) and the FASA release's bbox head (feature_mean, feature_std,
feature_used, prob_list).
"""

from typing import Dict, List
import torch

BLOCKS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


def _bn(prefix: str, n: int, g: torch.Generator) -> Dict[str, torch.Tensor]:
    return {
        f"{prefix}.weight": torch.rand(n, generator=g) + 0.5,
        f"{prefix}.bias": torch.randn(n, generator=g) * 0.1,
        f"{prefix}.running_mean": torch.randn(n, generator=g) * 0.1,
        f"{prefix}.running_var": torch.rand(n, generator=g) + 0.5,
        f"{prefix}.num_batches_tracked": torch.tensor(1000),
    }


def _conv(prefix: str, out_c: int, in_c: int, k: int, g, bias=False, std=0.05):
    state = {f"{prefix}.weight": torch.randn(out_c, in_c, k, k, generator=g) * std}
    if bias:
        state[f"{prefix}.bias"] = torch.randn(out_c, generator=g) * 0.01
    return state


def _linear(prefix: str, out_f: int, in_f: int, g, std=0.01):
    return {
        f"{prefix}.weight": torch.randn(out_f, in_f, generator=g) * std,
        f"{prefix}.bias": torch.randn(out_f, generator=g) * 0.01,
    }


def resnet_fpn_rpn(depth: int, g: torch.Generator) -> Dict[str, torch.Tensor]:
    s = {}
    s.update(_conv("backbone.conv1", 64, 3, 7, g))
    s.update(_bn("backbone.bn1", 64, g))
    inplanes = 64
    for i, n in enumerate(BLOCKS[depth]):
        planes = 64 * 2**i
        for b in range(n):
            p = f"backbone.layer{i + 1}.{b}"
            s.update(_conv(f"{p}.conv1", planes, inplanes, 1, g))
            s.update(_bn(f"{p}.bn1", planes, g))
            s.update(_conv(f"{p}.conv2", planes, planes, 3, g))
            s.update(_bn(f"{p}.bn2", planes, g))
            s.update(_conv(f"{p}.conv3", planes * 4, planes, 1, g))
            s.update(_bn(f"{p}.bn3", planes * 4, g))
            if b == 0:
                s.update(_conv(f"{p}.downsample.0", planes * 4, inplanes, 1, g))
                s.update(_bn(f"{p}.downsample.1", planes * 4, g))
            inplanes = planes * 4
    for i, c in enumerate([256, 512, 1024, 2048]):
        s.update(_conv(f"neck.lateral_convs.{i}.conv", 256, c, 1, g, bias=True))
        s.update(_conv(f"neck.fpn_convs.{i}.conv", 256, 256, 3, g, bias=True))
    s.update(_conv("rpn_head.rpn_conv", 256, 256, 3, g, bias=True))
    s.update(_conv("rpn_head.rpn_cls", 3, 256, 1, g, bias=True))
    s.update(_conv("rpn_head.rpn_reg", 12, 256, 1, g, bias=True))
    return s


def bbox_head(prefix: str, num_classes: int, *, seesaw: bool, agnostic: bool, g, fasa=False):
    s = {}
    s.update(_linear(f"{prefix}.shared_fcs.0", 1024, 256 * 7 * 7, g))
    s.update(_linear(f"{prefix}.shared_fcs.1", 1024, 1024, g))
    s.update(_linear(f"{prefix}.fc_cls", num_classes + (2 if seesaw else 1), 1024, g))
    s.update(_linear(f"{prefix}.fc_reg", 4 if agnostic else 4 * num_classes, 1024, g))
    if seesaw:
        s[f"{prefix}.loss_cls.cum_samples"] = torch.randint(
            0, 10**6, (num_classes + 1,), generator=g
        ).float()
    if fasa:
        used = (torch.rand(num_classes, generator=g) < 0.9).float()
        s[f"{prefix}.feature_mean"] = torch.rand(num_classes, 1024, generator=g) * used[:, None]
        s[f"{prefix}.feature_std"] = torch.rand(num_classes, 1024, generator=g) * used[:, None]
        s[f"{prefix}.feature_used"] = used
        s[f"{prefix}.prob_list"] = torch.rand(num_classes, generator=g) * 0.01
        # a Parameter once the release's first adaptation pass has run
        s[f"{prefix}.cum_loss_perclass_t1"] = torch.rand(num_classes + 1, generator=g)
    return s


def mask_head(prefix: str, num_classes: int, g) -> Dict[str, torch.Tensor]:
    s = {}
    for i in range(4):
        s.update(_conv(f"{prefix}.convs.{i}.conv", 256, 256, 3, g, bias=True))
    # ConvTranspose2d(256, 256, 2, stride=2): weight (in, out, k, k)
    s[f"{prefix}.upsample.weight"] = torch.randn(256, 256, 2, 2, generator=g) * 0.05
    s[f"{prefix}.upsample.bias"] = torch.randn(256, generator=g) * 0.01
    s.update(_conv(f"{prefix}.conv_logits", num_classes, 256, 1, g, bias=True))
    return s


def mask_rcnn_state(depth=50, num_classes=1203, *, seesaw=True, fasa=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = resnet_fpn_rpn(depth, g)
    s.update(
        bbox_head("roi_head.bbox_head", num_classes, seesaw=seesaw, agnostic=False, g=g, fasa=fasa)
    )
    s.update(mask_head("roi_head.mask_head", num_classes, g))
    return s


def cascade_mask_rcnn_state(depth=101, num_classes=1203, *, seesaw=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = resnet_fpn_rpn(depth, g)
    for k in range(3):
        s.update(
            bbox_head(f"roi_head.bbox_head.{k}", num_classes, seesaw=seesaw, agnostic=True, g=g)
        )
        s.update(mask_head(f"roi_head.mask_head.{k}", num_classes, g))
    return s


def checkpoint(state, classes: List[str], version="2.x"):
    """An mmdetection checkpoint dict: 2.x keeps the names in meta.CLASSES, 3.x in
    meta.dataset_meta.classes."""
    if version == "2.x":
        meta = {"mmdet_version": "2.18.0", "CLASSES": tuple(classes), "epoch": 24}
    else:
        meta = {"mmdet_version": "3.3.0", "dataset_meta": {"classes": tuple(classes)}}
    return {"meta": meta, "state_dict": state}
