# Copyright (c) fasa_seesaw contributors.
"""
Feature augmentations that can take the place of FASA's Gaussian virtual features, as plain torch
functions on a per-class store of real features (:class:`.fasa_feature_store.ClassFeatureStore`):

- SMOTE (Chawla et al., JAIR 2002; as FASA's supplement section F applies it to RoI features): a
  stored feature x_i of class c, one of its k nearest neighbours x_j (cosine) among c's other
  stored features, x_hat = lam * x_i + (1 - lam) * x_j with lam uniform in (0, 1].
- MoEx (Li et al., CVPR 2021, with PONO moments as its official code): x_hat = (x_A - mu_A) /
  sigma_A * sigma_B + mu_B, mean and standard deviation over the feature's channels, trained with
  lam * L(x_hat, y_A) + (1 - lam) * L(x_hat, y_B).

Every function works on all classes at once (no Python loop over classes) and reads no value back
to the host. A store is ``features`` (C, M, D) with ``size`` (C,) valid slots per class, slots
``0 .. size[c] - 1`` (a ring buffer fills them in that order).
"""

from typing import Callable, NamedTuple, Optional
import torch
from torch.nn import functional as F

from ..errors import check_choice, check_range

__all__ = [
    "AUGMENTATIONS",
    "check_augment_settings",
    "draw_classes",
    "smote_neighbours",
    "interpolate",
    "sample_smote",
    "moex_exchange",
    "moex_partners",
    "sample_moex",
    "mixed_loss",
    "VirtualRows",
]

AUGMENTATIONS = ("gaussian", "smote", "moex")


def check_augment_settings(
    augmentation: str, memory: int, smote_k: int, moex_lambda: float, moex_prob, moex_eps
) -> None:
    """Raise ConfigError naming the MODEL.FASA key of a bad augmentation setting."""
    from ..errors import ConfigError

    check_choice("MODEL.FASA.AUGMENTATION", augmentation, AUGMENTATIONS)
    if smote_k < 1:
        raise ConfigError(
            f"MODEL.FASA.SMOTE_K must be >= 1 (the supplement uses 5); got {smote_k!r}."
        )
    check_range("MODEL.FASA.MOEX_LAMBDA", moex_lambda, 0.0, 1.0, low_open=True)
    check_range("MODEL.FASA.MOEX_PROB", moex_prob, 0.0, 1.0)
    check_range("MODEL.FASA.MOEX_EPS", moex_eps, 0.0, float("inf"), low_open=True)
    need = {"smote": 2, "moex": 1}.get(augmentation, 0)
    if memory < need:
        raise ConfigError(
            f"MODEL.FASA.FEATURE_MEMORY {memory!r} is too small for AUGMENTATION "
            f"{augmentation!r}: it needs at least {need} stored features per class "
            f"({'a feature and a neighbour' if need == 2 else 'one feature'}); use e.g. 16."
        )


class VirtualRows(NamedTuple):
    """Virtual features and how they are trained: ``features`` (N, D), ``labels`` (N,), ``weight``
    (N,) 0/1; with ``labels_b`` and ``lam`` (N,) the loss is lam * L(labels) + (1 - lam) *
    L(labels_b) (MoEx)."""

    features: torch.Tensor
    labels: torch.Tensor
    weight: torch.Tensor
    labels_b: Optional[torch.Tensor] = None
    lam: Optional[torch.Tensor] = None


def draw_classes(
    probs: torch.Tensor,
    available: torch.Tensor,
    dtype: torch.dtype,
    generator: Optional[torch.Generator] = None,
    compact: Optional[bool] = None,
):
    """
    FASA's draw: class c is drawn with probability p_c if ``available[c]``.

    Returns ``(classes, weight)``: compact (the default on CPU) the drawn classes, weight 1; else
    all C classes with a 0/1 weight (no host-device sync). One ``torch.rand(C)`` per call.
    """
    C = probs.shape[0]
    device = available.device
    if compact is None:
        compact = device.type == "cpu"
    u = torch.rand(C, device=device, generator=generator)
    drawn = (u < probs.to(device=device, dtype=u.dtype)) & available
    if compact:
        classes = drawn.nonzero().squeeze(1)
        return classes, torch.ones(classes.numel(), device=device, dtype=dtype)
    return torch.arange(C, device=device), drawn.to(dtype)


def _pick(u: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """An index uniform in [0, n) from u uniform in [0, 1) (0 where n is 0)."""
    return (u * n).long().clamp(min=0).minimum((n - 1).clamp(min=0))


def smote_neighbours(features: torch.Tensor, size: torch.Tensor, k: int):
    """
    For every stored feature, its nearest stored features of the same class by cosine
    similarity, most similar first.

    Args:
        features: (C, M, D) store; size: (C,) valid slots per class.
        k: neighbours wanted.

    Returns:
        ``(neighbours, k_eff)``: (C, M, min(k, M - 1)) slot indices (entries at rank >=
        ``k_eff[c]`` are meaningless) and (C,) ``min(k, size - 1)`` (0 for size <= 1).
    """
    C, M, _ = features.shape
    unit = F.normalize(features.float(), dim=-1)
    sim = unit @ unit.transpose(1, 2)  # (C, M, M): M x M per class, never (C M)^2
    slots = torch.arange(M, device=features.device)
    invalid = (slots[None, None, :] >= size[:, None, None]) | torch.eye(
        M, dtype=torch.bool, device=features.device
    )
    sim = sim.masked_fill(invalid, float("-inf"))
    kk = max(min(k, M - 1), 1)
    neighbours = sim.topk(kk, dim=-1).indices
    k_eff = (size - 1).clamp(min=0).clamp(max=k)
    return neighbours, k_eff


def interpolate(x_i: torch.Tensor, x_j: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """SMOTE's x_hat = lam * x_i + (1 - lam) * x_j (lam broadcast over the last dimension)."""
    lam = lam.to(x_i.dtype)[..., None]
    return lam * x_i + (1 - lam) * x_j


def sample_smote(
    features: torch.Tensor,
    size: torch.Tensor,
    probs: torch.Tensor,
    samples_per_class: int = 1,
    k: int = 5,
    generator: Optional[torch.Generator] = None,
    compact: Optional[bool] = None,
) -> VirtualRows:
    """
    SMOTE in FASA's slot: each class with >= 2 stored features is drawn with probability p_c and
    gives ``samples_per_class`` rows, each from its own anchor x_i (uniform over the class's stored
    features), neighbour x_j (uniform over the anchor's ``min(k, size - 1)`` nearest) and lam.
    """
    classes, weight = draw_classes(probs, size >= 2, features.dtype, generator, compact)
    rows = classes.repeat_interleave(samples_per_class)
    n = rows.numel()
    neighbours, k_eff = smote_neighbours(features, size, k)
    u = torch.rand(3, n, device=features.device, generator=generator)
    i = _pick(u[0], size[rows])
    j = neighbours[rows, i, _pick(u[1], k_eff[rows])]
    lam = 1.0 - u[2]  # uniform in (0, 1]
    x = interpolate(features[rows, i], features[rows, j], lam)
    return VirtualRows(x, rows, weight.repeat_interleave(samples_per_class))


def moex_exchange(x_a: torch.Tensor, x_b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """
    MoEx with PONO moments of (N, D) features: each row's mean and standard deviation over its D
    channels, sigma = sqrt(var + eps) with the unbiased variance (the official code's
    ``x.var(dim=1)``); x_hat = (x_a - mu_a) / sigma_a * sigma_b + mu_b, in float32.
    """
    x_a, x_b = x_a.float(), x_b.float()
    mu_a, mu_b = x_a.mean(-1, keepdim=True), x_b.mean(-1, keepdim=True)
    sd_a = (x_a.var(-1, keepdim=True) + eps).sqrt()
    sd_b = (x_b.var(-1, keepdim=True) + eps).sqrt()
    return (x_a - mu_a) / sd_a * sd_b + mu_b


def moex_partners(size: torch.Tensor, classes: torch.Tensor, u: torch.Tensor):
    """
    For each row of class ``classes[r]``, a stored feature of any *other* class, uniform over all
    of them (u (N,) uniform in [0, 1)). Returns ``(class_b, slot_b, ok)``; ``ok`` is False where
    no other class has a stored feature (the row's partner is then meaningless).
    """
    end = size.cumsum(0)
    start = end - size
    n_c = size[classes]
    others = end[-1] - n_c
    r = _pick(u, others)
    # r-th stored feature in class order with class c's block skipped.
    g = r + (r >= start[classes]).long() * n_c
    class_b = torch.searchsorted(end, g, right=True).clamp(max=size.numel() - 1)
    return class_b, g - start[class_b], others > 0


def sample_moex(
    features: torch.Tensor,
    size: torch.Tensor,
    probs: torch.Tensor,
    samples_per_class: int = 1,
    lam: float = 0.9,
    prob: float = 1.0,
    eps: float = 1e-5,
    generator: Optional[torch.Generator] = None,
    compact: Optional[bool] = None,
) -> VirtualRows:
    """
    MoEx in FASA's slot: each class with a stored feature (while another class has one too) is
    drawn with probability p_c and gives ``samples_per_class`` rows: x_A uniform over its stored
    features, x_B uniform over the stored features of all other classes, x_hat = MoEx(x_A, x_B)
    with label weights (lam, 1 - lam) for (c, y_B). With probability 1 - ``prob`` (one draw per
    call, as the official code draws once per batch) no exchange happens: x_hat = x_A, lam = 1.
    """
    others = size.sum() - size
    available = (size >= 1) & (others >= 1)
    classes, weight = draw_classes(probs, available, features.dtype, generator, compact)
    rows = classes.repeat_interleave(samples_per_class)
    n = rows.numel()
    u = torch.rand(2 * n + 1, device=features.device, generator=generator)
    x_a = features[rows, _pick(u[:n], size[rows])]
    class_b, slot_b, _ = moex_partners(size, rows, u[n : 2 * n])
    x_b = features[class_b, slot_b]
    apply = u[2 * n] < prob
    exchanged = moex_exchange(x_a, x_b, eps).to(x_a.dtype) if n else x_a
    x = torch.where(apply, exchanged, x_a)
    one = torch.ones(n, device=x.device, dtype=x.dtype)
    lam_rows = torch.where(apply, one * lam, one)
    return VirtualRows(x, rows, weight.repeat_interleave(samples_per_class), class_b, lam_rows)


def mixed_loss(
    per_roi_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    logits: torch.Tensor,
    labels_a: torch.Tensor,
    labels_b: torch.Tensor,
    lam: torch.Tensor,
) -> torch.Tensor:
    """MoEx's label mixing per row: lam * L(logits, y_A) + (1 - lam) * L(logits, y_B)."""
    lam = lam.to(logits.dtype)
    return lam * per_roi_loss(logits, labels_a) + (1 - lam) * per_roi_loss(logits, labels_b)
