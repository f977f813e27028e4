# Copyright (c) fasa_seesaw contributors.
"""
The domain of every key the project adds to the config (``add_fasa_seesaw_config``), checked in
one place before anything is built: a value outside its domain is a ConfigError that names the
key, the value, what is allowed and, where the papers fix it, the usual value.

A new key needs a row in :data:`SETTINGS`; ``tests/test_settings.py`` fails otherwise.
"""

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Sequence

from ..data.resize import RESIZE_BACKENDS
from ..errors import ConfigError
from ..evaluation.lvis_engines import ENGINES
from ..evaluation.report import EXTRAS
from ..modeling.cls_losses import cls_loss_names
from ..modeling.fasa_feature_bank import _MODES, VARIANCES
from ..modeling.fasa_sampling import GROUP_SIGNALS, INIT_PROBS
from ..modeling.feature_augment import AUGMENTATIONS
from ..modeling.global_context import CONTEXT_NORMS, CONTEXT_TARGETS
from ..modeling.nms_resampling import NMS_RESAMPLING_MODES
from ..modeling.roi_heads import CASCADE_MASK_HEADS, SCORE_AVERAGES
from .fasa_hook import CLUSTERING

__all__ = ["SETTINGS", "Domain", "check_settings", "project_keys"]


@dataclass(frozen=True)
class Domain:
    """What a key accepts: ``accepts(value)`` and the words that say it (``text``)."""

    text: str
    accepts: Callable[[Any], bool]
    hint: str = ""


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def boolean(hint: str = "") -> Domain:
    return Domain("True or False", lambda v: isinstance(v, bool), hint)


def number(
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> Domain:
    """A finite number in an interval."""

    def accepts(v):
        if not _is_number(v):
            return False
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return above and below

    if high == math.inf:
        text = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        text = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return Domain(text, accepts, hint)


def integer(low: int, high: float = math.inf, *, or_minus_one: str = "", hint: str = "") -> Domain:
    """An integer >= low (and <= high); ``or_minus_one`` names what -1 means, if it is allowed."""

    def accepts(v):
        return _is_int(v) and ((low <= v <= high) or (bool(or_minus_one) and v == -1))

    text = f"an integer >= {low}" if high == math.inf else f"an integer in [{low}, {high:.0f}]"
    if or_minus_one:
        text += f", or -1 ({or_minus_one})"
    return Domain(text, accepts, hint)


def one_of(choices: Sequence[str], hint: str = "") -> Domain:
    choices = tuple(choices)
    return Domain(f"one of {list(choices)}", lambda v: v in choices, hint)


def subset_of(choices: Sequence[str], hint: str = "") -> Domain:
    choices = tuple(choices)
    return Domain(
        f"a list of distinct names from {list(choices)}",
        lambda v: isinstance(v, (list, tuple))
        and all(x in choices for x in v)
        and len(set(v)) == len(v),
        hint,
    )


def numbers(low: float = 0.0, hint: str = "") -> Domain:
    """A list of finite numbers >= low (possibly empty)."""
    return Domain(
        f"a list of finite numbers >= {low:g} (or [])",
        lambda v: isinstance(v, (list, tuple)) and all(_is_number(x) and x >= low for x in v),
        hint,
    )


def text(hint: str = "") -> Domain:
    return Domain("a string", lambda v: isinstance(v, str), hint)


# scikit-learn's random_state and numpy's seeds: 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1


def _settings() -> Dict[str, Domain]:
    weight = number(0.0)
    return {
        "MODEL.ROI_BOX_HEAD.CLS_LOSS": one_of(("auto",) + tuple(cls_loss_names())),
        "MODEL.ROI_BOX_HEAD.NORMED_CLASSIFIER": boolean(),
        "MODEL.ROI_BOX_HEAD.NORM_TEMP": number(0.0, low_open=True, hint="the papers use 20"),
        "MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED": boolean(),
        "MODEL.ROI_MASK_HEAD.NORM_TEMP": number(0.0, low_open=True, hint="the papers use 20"),
        "MODEL.ROI_BOX_CASCADE_HEAD.SCORE_AVERAGE": one_of(
            SCORE_AVERAGES, hint="mmdetection averages logits"
        ),
        "MODEL.ROI_BOX_CASCADE_HEAD.MASK_HEADS": one_of(
            CASCADE_MASK_HEADS, hint="mmdetection has one per stage; HTC-Lite only the last"
        ),
        "MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS": numbers(
            hint="one per stage; mmdetection uses [1.0, 0.5, 0.25]"
        ),
        "MODEL.GLOBAL_CONTEXT.ENABLED": boolean(),
        "MODEL.GLOBAL_CONTEXT.IN_FEATURES": Domain(
            "a non-empty list of distinct pyramid level names",
            lambda v: isinstance(v, (list, tuple))
            and len(v) > 0
            and all(isinstance(x, str) and x for x in v)
            and len(set(v)) == len(v),
            "mmdetection reads the coarsest level, ['p6']",
        ),
        "MODEL.GLOBAL_CONTEXT.NUM_CONVS": integer(0, hint="mmdetection's SCNet uses 4"),
        "MODEL.GLOBAL_CONTEXT.CONV_DIM": integer(1, hint="mmdetection's SCNet uses 256"),
        "MODEL.GLOBAL_CONTEXT.RESIDUAL": boolean(),
        "MODEL.GLOBAL_CONTEXT.NORM": one_of(
            CONTEXT_NORMS, hint="mmdetection's SCNet uses none ('')"
        ),
        "MODEL.GLOBAL_CONTEXT.LOSS_WEIGHT": number(0.0, hint="mmdetection's SCNet uses 3.0"),
        "MODEL.GLOBAL_CONTEXT.TARGET": one_of(
            CONTEXT_TARGETS, hint="federated follows LVIS's labels"
        ),
        "INPUT.RESIZE_BACKEND": one_of(RESIZE_BACKENDS, hint="mmdetection resizes with cv2"),
        "MODEL.RPN.NMS_RESAMPLING.ENABLED": boolean(),
        "MODEL.RPN.NMS_RESAMPLING.MODE": one_of(
            NMS_RESAMPLING_MODES, hint="the official LVIS configs use discrete"
        ),
        "MODEL.RPN.NMS_RESAMPLING.THRESHOLDS": Domain(
            "three IoU thresholds in (0, 1] for rare, common and frequent",
            lambda v: isinstance(v, (list, tuple))
            and len(v) == 3
            and all(_is_number(x) and 0.0 < x <= 1.0 for x in v),
            "Forest R-CNN uses [0.9, 0.8, 0.7]",
        ),
        "MODEL.RPN.NMS_RESAMPLING.MATCH_IOU": number(0.0, 1.0, hint="Forest R-CNN uses 0.3"),
        "MODEL.SEESAW.P": number(0.0, hint="the paper uses 0.8; 0 switches mitigation off"),
        "MODEL.SEESAW.Q": number(0.0, hint="the paper uses 2.0; 0 switches compensation off"),
        "MODEL.SEESAW.EPS": number(0.0, 1.0, low_open=True, hint="the paper uses 0.01"),
        "MODEL.SEESAW.LOSS_WEIGHT": weight,
        "MODEL.SEESAW.OBJECTNESS_LOSS_WEIGHT": weight,
        "MODEL.SEESAW.SYNC_COUNTS": boolean(),
        "MODEL.EQL.LAMBDA": number(
            0.0, hint="the official LVIS v1 config uses 0.0011; 0 is sigmoid CE"
        ),
        "MODEL.EQL.LOSS_WEIGHT": weight,
        "MODEL.EQL.PRIOR_PROB": number(
            0.0, 1.0, low_open=True, high_open=True, hint="the official code uses 0.001"
        ),
        "MODEL.EQLV2.GAMMA": number(0.0, hint="the paper uses 12"),
        "MODEL.EQLV2.MU": number(0.0, hint="the paper uses 0.8"),
        "MODEL.EQLV2.ALPHA": number(0.0, hint="the paper uses 4"),
        "MODEL.EQLV2.LOSS_WEIGHT": weight,
        "MODEL.EQLV2.PRIOR_PROB": number(
            0.0, 1.0, low_open=True, high_open=True, hint="the official code uses 0.001"
        ),
        "MODEL.EQLV2.TEST_WITH_OBJ": boolean(),
        "MODEL.EQLV2.SYNC_STATS": boolean(),
        "MODEL.FASA.ENABLED": boolean(),
        "MODEL.FASA.LOSS_WEIGHT": number(0.0, hint="the paper uses 0.1"),
        "MODEL.FASA.SAMPLES_PER_CLASS": integer(1),
        "MODEL.FASA.CLAMP_MIN_ZERO": boolean(),
        "MODEL.FASA.WARMUP_ITERS": integer(0, or_minus_one="one epoch"),
        "MODEL.FASA.BANK_MODE": one_of(_MODES),
        "MODEL.FASA.BANK_MOMENTUM": number(0.0, 1.0, low_open=True, hint="the reference uses 0.1"),
        "MODEL.FASA.BANK_VARIANCE": one_of(VARIANCES),
        "MODEL.FASA.SYNC_BANK": boolean(),
        "MODEL.FASA.INIT_PROBS": one_of(INIT_PROBS),
        "MODEL.FASA.AUGMENTATION": one_of(AUGMENTATIONS, hint="FASA's is gaussian"),
        "MODEL.FASA.FEATURE_MEMORY": integer(1, hint="SMOTE needs >= 2; the default is 16"),
        "MODEL.FASA.SMOTE_K": integer(1, hint="the supplement uses 5"),
        "MODEL.FASA.MOEX_LAMBDA": number(
            0.0, 1.0, low_open=True, hint="MoEx's ImageNet recipe uses 0.9"
        ),
        "MODEL.FASA.MOEX_PROB": number(0.0, 1.0, hint="the supplement uses 1.0"),
        "MODEL.FASA.MOEX_EPS": number(0.0, low_open=True, hint="the supplement uses 1e-5"),
        "MODEL.FASA.ADAPT.ENABLED": boolean(),
        "MODEL.FASA.ADAPT.PERIOD": integer(
            1,
            or_minus_one="one epoch",
            hint="0 would never adapt; set ADAPT.ENABLED False for that",
        ),
        "MODEL.FASA.ADAPT.HELDOUT_DATASET": text('"" carves a part of DATASETS.TRAIN'),
        "MODEL.FASA.ADAPT.AUGMENT": boolean(),
        "MODEL.FASA.ADAPT.HELDOUT_FRACTION": number(
            0.0, 1.0, low_open=True, high_open=True, hint="the default is 0.1"
        ),
        "MODEL.FASA.ADAPT.SEED": integer(0, MAX_SEED, hint="what scikit-learn accepts"),
        "MODEL.FASA.ADAPT.CLUSTERING": one_of(CLUSTERING),
        "MODEL.FASA.ADAPT.BANDWIDTH": number(0.0, hint="0 uses BANDWIDTH_QUANTILE"),
        "MODEL.FASA.ADAPT.BANDWIDTH_QUANTILE": number(0.0, 1.0, low_open=True),
        "MODEL.FASA.ADAPT.AFFINITY_DAMPING": number(
            0.5, 1.0, high_open=True, hint="scikit-learn's AffinityPropagation"
        ),
        "MODEL.FASA.ADAPT.GROUP_SIGNAL": one_of(GROUP_SIGNALS),
        "MODEL.FASA.ADAPT.SIGNAL": one_of(("loss", "metric")),
        "MODEL.FASA.ADAPT.UP_FACTOR": number(
            1.0, low_open=True, hint="p grows for a group whose loss fell; the paper uses 1.1"
        ),
        "MODEL.FASA.ADAPT.DOWN_FACTOR": number(
            0.0,
            1.0,
            low_open=True,
            high_open=True,
            hint="p shrinks for a group whose loss rose; the paper uses 0.9",
        ),
        "TEST.LVIS.ENGINE": one_of(ENGINES),
        "TEST.LVIS.EXTRAS": subset_of(EXTRAS),
        "TEST.LVIS.FIXED_K": integer(1, hint="AP-Fixed uses 10000"),
        "TEST.LVIS.TOPK_PER_CLASS": integer(0, hint="0 is off; else at least FIXED_K"),
        "TEST.LVIS.TOPK_MAX_PER_IMAGE": integer(1, or_minus_one="no cap"),
        "TEST.LVIS.FIGURES": boolean(),
        "FASA_SEESAW.PROGRESS_PERIOD": integer(0, hint="0 is off"),
        "FASA_SEESAW.CHECK_NUM_CLASSES": boolean(),
        "FASA_SEESAW.HOLD_OUT_FASA_SPLIT": boolean(),
        "FASA_SEESAW.GRAD_STATS.ENABLED": boolean(),
    }


SETTINGS: Dict[str, Domain] = _settings()


def _get(cfg, key: str):
    node = cfg
    for name in key.split("."):
        node = node[name]
    return node


def project_keys():
    """The keys ``add_fasa_seesaw_config`` adds to detectron2's config, dotted, leaves only."""
    from detectron2.config import get_cfg

    from ..config import add_fasa_seesaw_config

    def leaves(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield prefix + k

    ours = get_cfg()
    add_fasa_seesaw_config(ours)
    return sorted(set(leaves(ours)) - set(leaves(get_cfg())))


def check_settings(cfg) -> None:
    """Raise ConfigError for the first project key whose value is outside its domain."""
    for key, domain in SETTINGS.items():
        value = _get(cfg, key)
        if not domain.accepts(value):
            hint = f" ({domain.hint})" if domain.hint else ""
            raise ConfigError(f"{key} is {value!r}; it must be {domain.text}{hint}.")
    fasa = cfg.MODEL.FASA
    if fasa.AUGMENTATION == "smote" and fasa.FEATURE_MEMORY < 2:
        raise ConfigError(
            f"MODEL.FASA.FEATURE_MEMORY is {fasa.FEATURE_MEMORY}; AUGMENTATION 'smote' needs at "
            "least 2 stored features per class (a feature and a neighbour); use e.g. 16."
        )
    lvis = cfg.TEST.LVIS
    if 0 < lvis.TOPK_PER_CLASS < lvis.FIXED_K:
        raise ConfigError(
            f"TEST.LVIS.TOPK_PER_CLASS ({lvis.TOPK_PER_CLASS}) is below FIXED_K "
            f"({lvis.FIXED_K}): every class would count as having fewer than K; make them equal."
        )
