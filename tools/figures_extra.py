# Copyright (c) fasa_seesaw contributors.
"""
The figures of ``tools/plot_figures.py``, written as PNG files:

- a t-SNE of FASA's class feature means coloured by adaptation group (FASA supplement, Figure 1);
- two models' predictions on the same image, side by side (FASA supplement, Figure 2).

Plain arrays in, files out, drawn like the package's figures (:mod:`fasa_seesaw.evaluation.figures`,
whose canvas, saving and r/c/f helpers they use).
"""

import numpy as np
from typing import Mapping, Optional, Sequence
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from fasa_seesaw.evaluation import figures

__all__ = [
    "tsne_embedding",
    "fasa_tsne_figure",
    "plot_fasa_tsne",
    "side_by_side_figure",
    "plot_side_by_side",
]


def tsne_embedding(points: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """
    2-D t-SNE of (N, D) points with a fixed random state. The perplexity is clipped below N, as
    t-SNE requires; fewer than 3 points (or all identical) are laid out on a line instead.
    """
    x = np.asarray(points, dtype=np.float64)
    n = x.shape[0]
    if n < 3 or not np.ptp(x, axis=0).any():
        return np.stack([np.arange(n) - (n - 1) / 2.0, np.zeros(n)], axis=1)
    from sklearn.manifold import TSNE

    from threadpoolctl import threadpool_limits

    tsne = TSNE(
        n_components=2,
        perplexity=float(min(perplexity, n - 1)),
        init="pca" if x.shape[1] >= 2 else "random",
        random_state=seed,
    )
    # One OpenMP thread: the Barnes-Hut gradient's threads spin when the cores are busy (12
    # points took 25 s on a shared 2-core machine, 0.1 s single-threaded), and a fixed
    # summation order keeps the layout identical from run to run.
    with threadpool_limits(1, user_api="openmp"):
        return tsne.fit_transform(x)


def _group_colors(num: int):
    from matplotlib import colormaps

    if num <= 10:
        return [colormaps["tab10"](i) for i in range(num)]
    if num <= 20:
        return [colormaps["tab20"](i) for i in range(num)]
    return [colormaps["turbo"](v) for v in np.linspace(0.05, 0.95, num)]


_FREQUENCY_MARKERS = {"f": "o", "c": "s", "r": "^"}


def fasa_tsne_figure(
    means: np.ndarray,
    seen,
    groups,
    frequency=None,
    seed: int = 0,
    class_names: Optional[Sequence[str]] = None,
) -> Figure:
    """The figure of :func:`plot_fasa_tsne`."""
    means = np.asarray(means, dtype=np.float64)
    C = means.shape[0]
    seen = np.asarray(seen, dtype=bool)
    groups = np.asarray(groups, dtype=np.int64)
    if seen.shape != (C,) or groups.shape != (C,):
        raise ValueError(f"means has {C} classes but seen {seen.shape}, groups {groups.shape}")
    freq = figures.as_frequency(frequency, C)
    idx = np.flatnonzero(seen)
    xy = tsne_embedding(means[idx], seed=seed)
    group_ids = np.unique(groups[idx])
    colors = dict(zip(group_ids.tolist(), _group_colors(len(group_ids))))

    fig = figures.new_figure(7.5, 6.5)
    ax = fig.add_subplot(1, 1, 1)
    for f in np.unique(freq[idx]):
        sel = freq[idx] == f
        ax.scatter(
            xy[sel, 0],
            xy[sel, 1],
            c=[colors[g] for g in groups[idx][sel]],
            marker=_FREQUENCY_MARKERS.get(f, "o"),
            s=36,
            edgecolors="k",
            linewidths=0.4,
            zorder=2,
        )
    if class_names is not None and len(idx) <= 80:
        for k, c in enumerate(idx):
            ax.annotate(
                str(class_names[c]), xy[k], fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    handles = []
    if len(group_ids) <= 20:
        handles += [
            Line2D([], [], ls="", marker="o", color=colors[g], label=f"group {g}")
            for g in group_ids
        ]
    if frequency is not None:
        handles += [
            Line2D(
                [],
                [],
                ls="",
                marker=_FREQUENCY_MARKERS[f],
                color="0.5",
                label=figures.FREQUENCY_NAMES[f],
            )
            for f in ("f", "c", "r")
            if (freq[idx] == f).any()
        ]
    if handles:
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    if len(idx) == 0:
        ax.text(0.5, 0.5, "no class seen yet", transform=ax.transAxes, ha="center")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(
        f"FASA class groups: t-SNE of class feature means "
        f"({len(idx)} seen classes, {len(group_ids)} groups)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def plot_fasa_tsne(
    means: np.ndarray,
    seen,
    groups,
    path: str,
    frequency=None,
    seed: int = 0,
    class_names: Optional[Sequence[str]] = None,
) -> str:
    """
    t-SNE of FASA's class feature means of the seen classes, coloured by adaptation group (the
    FASA supplement's Figure 1): classes that MeanShift put together should sit together.

    Args:
        means: (C, D) class feature means (the feature bank's ``mean``).
        seen: (C,) bool, classes the bank has observed; only these are embedded.
        groups: (C,) group ids (``FASAAdaptationHook.groups`` of one predictor).
        frequency: optional (C,) "r"/"c"/"f", shown as marker shapes.
        seed: t-SNE random state.
        class_names: optional names, written next to the points when there are at most 80.

    Returns:
        path
    """
    return figures.save(fasa_tsne_figure(means, seen, groups, frequency, seed, class_names), path)


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _draw_predictions(ax, image: np.ndarray, preds: Mapping, class_names, score_thresh) -> int:
    from matplotlib import colormaps

    ax.imshow(image)
    scores = _np(preds["scores"]).astype(np.float64).reshape(-1)
    boxes = _np(preds["boxes"]).astype(np.float64).reshape(-1, 4)
    classes = _np(preds["classes"]).astype(np.int64).reshape(-1)
    masks = preds.get("masks", None)
    masks = None if masks is None else _np(masks).astype(bool)
    # Lowest score first, so the most confident detections are drawn on top.
    keep = np.flatnonzero(scores >= score_thresh)
    keep = keep[np.argsort(scores[keep], kind="stable")]
    palette = colormaps["tab20"]
    if masks is not None and len(keep):
        overlay = np.zeros(image.shape[:2] + (4,), dtype=np.float32)
        for i in keep:
            overlay[masks[i]] = (*palette(classes[i] % 20)[:3], 0.45)
        ax.imshow(overlay)
    for i in keep:
        color = palette(classes[i] % 20)
        x0, y0, x1, y1 = boxes[i]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=color, lw=1.5))
        c = classes[i]
        name = class_names[c] if 0 <= c < len(class_names) else str(c)
        ax.text(
            x0,
            y0,
            f"{name} {scores[i]:.2f}",
            fontsize=7,
            va="bottom",
            color="white",
            bbox=dict(facecolor=color, alpha=0.7, pad=1, lw=0),
        )
    ax.set_axis_off()
    return len(keep)


def side_by_side_figure(
    image_rgb: np.ndarray,
    preds_a: Mapping,
    preds_b: Mapping,
    names: Sequence[str],
    class_names: Sequence[str],
    score_thresh: float = 0.3,
) -> Figure:
    """The figure of :func:`plot_side_by_side`."""
    image = _np(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image_rgb must be (H, W, 3); got {image.shape}")
    if len(names) != 2:
        raise ValueError(f"names must hold two titles; got {len(names)}")
    h, w = image.shape[:2]
    panel_w = 6.0
    fig = figures.new_figure(2 * panel_w, panel_w * h / max(w, 1) + 0.6)
    for k, (preds, name) in enumerate(zip((preds_a, preds_b), names)):
        ax = fig.add_subplot(1, 2, k + 1)
        shown = _draw_predictions(ax, image, preds, class_names, score_thresh)
        ax.set_title(f"{name} ({shown} with score >= {score_thresh:g})", fontsize=10)
    fig.tight_layout()
    return fig


def plot_side_by_side(
    image_rgb: np.ndarray,
    preds_a: Mapping,
    preds_b: Mapping,
    names: Sequence[str],
    path: str,
    class_names: Sequence[str],
    score_thresh: float = 0.3,
) -> str:
    """
    Two panels with the predictions of two models on the same image (FASA supplement,
    Figure 2), boxes and masks coloured by class, labelled with class name and score.

    Args:
        image_rgb: (H, W, 3) RGB image, uint8 or float in [0, 1].
        preds_a, preds_b: dicts with boxes (N, 4, XYXY absolute), scores (N,), classes (N,)
            and optionally masks (N, H, W) bool; numpy arrays or CPU/GPU tensors.
        names: the two panel titles.
        class_names: names by contiguous class id.
        score_thresh: detections below it are not drawn.

    Returns:
        path
    """
    fig = side_by_side_figure(image_rgb, preds_a, preds_b, names, class_names, score_thresh)
    return figures.save(fig, path)
