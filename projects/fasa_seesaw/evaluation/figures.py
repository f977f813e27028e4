# Copyright (c) fasa_seesaw contributors.
"""
Figures for long-tailed detection, written as PNG files:

- per-category AP with categories sorted by training frequency (Seesaw supplement, Figure A2);
- the ratio of cumulative positive to negative classification gradients per category (Seesaw
  supplement, Figure A1);
- a t-SNE of FASA's class feature means coloured by adaptation group (FASA supplement, Figure 1);
- two models' predictions on the same image, side by side (FASA supplement, Figure 2).

Plain arrays in, files out: nothing here knows about models, trainers or datasets. Figures are
drawn on matplotlib's Agg canvas without pyplot, so plotting from a training process touches no
global backend state and needs no display. ``figure_to_chw_uint8`` turns any figure built here
into the image array that ``EventStorage.put_image`` takes, for TensorBoard.
"""

import numpy as np
import os
from typing import Mapping, Optional, Sequence
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.transforms import blended_transform_factory

__all__ = [
    "frequency_order",
    "figure_to_chw_uint8",
    "per_category_ap_figure",
    "plot_per_category_ap",
    "grad_ratio_figure",
    "plot_grad_ratio",
    "tsne_embedding",
    "fasa_tsne_figure",
    "plot_fasa_tsne",
    "side_by_side_figure",
    "plot_side_by_side",
]

FREQUENCY_NAMES = {"f": "frequent", "c": "common", "r": "rare"}
FREQUENCY_COLORS = {"f": "#1f77b4", "c": "#ff7f0e", "r": "#d62728"}
_UNKNOWN_COLOR = "#7f7f7f"
_DPI = 100
# Category names go on the x-axis up to this many categories; beyond, they would not be legible.
_MAX_TICK_LABELS = 60


def frequency_order(train_images, category_ids=None) -> np.ndarray:
    """
    Indices that sort categories by training images, most frequent first (the x-axis of the
    Seesaw supplement's Figures A1 and A2); ties keep category-id order, so the order is
    deterministic.
    """
    counts = np.asarray(train_images, dtype=np.float64)
    ids = np.arange(len(counts)) if category_ids is None else np.asarray(category_ids)
    if ids.shape != counts.shape:
        raise ValueError(f"{len(ids)} category ids for {len(counts)} training image counts")
    return np.lexsort((ids, -counts))


def figure_to_chw_uint8(fig: Figure) -> np.ndarray:
    """The rendered figure as a (3, H, W) uint8 RGB array, for ``EventStorage.put_image``."""
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3].transpose(2, 0, 1))


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def _as_frequency(frequency, n: int) -> np.ndarray:
    if frequency is None:
        return np.full(n, "?")
    freq = np.asarray([str(f) for f in frequency])
    if freq.shape != (n,):
        raise ValueError(f"{len(freq)} frequency labels for {n} categories")
    return freq


def _runs(labels: np.ndarray):
    """(label, start, stop) of each run of equal consecutive labels."""
    if len(labels) == 0:
        return []
    cuts = np.flatnonzero(labels[1:] != labels[:-1]) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [len(labels)]])
    return [(labels[a], int(a), int(b)) for a, b in zip(starts, stops)]


def _shade_frequency_regions(ax, freq_sorted: np.ndarray) -> None:
    """
    Light background per r/c/f region of the sorted x-axis, named above the axes. Sorting by
    training images makes the regions contiguous when the groups come from the same counts
    (f, then c, then r); otherwise each run is shaded and the longest one of a group is named.
    """
    runs = _runs(freq_sorted)
    longest = {}
    for label, a, b in runs:
        color = FREQUENCY_COLORS.get(label, _UNKNOWN_COLOR)
        ax.axvspan(a - 0.5, b - 0.5, color=color, alpha=0.1, lw=0, zorder=0)
        if b - a > longest.get(label, (0, 0, 0))[0]:
            longest[label] = (b - a, a, b)
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for label, (_, a, b) in longest.items():
        ax.text(
            (a + b - 1) / 2.0,
            1.01,
            FREQUENCY_NAMES.get(label, label),
            transform=top,
            ha="center",
            va="bottom",
            fontsize=9,
            color=FREQUENCY_COLORS.get(label, _UNKNOWN_COLOR),
        )


def _category_axis(ax, n: int, names_sorted: Optional[Sequence[str]], what: str) -> None:
    ax.set_xlim(-0.5, n - 0.5)
    if names_sorted is not None and 0 < n <= _MAX_TICK_LABELS:
        ax.set_xticks(np.arange(n))
        ax.set_xticklabels(names_sorted, rotation=90, fontsize=max(5, min(8, 400 // n)))
        ax.set_xlabel(f"{what} (sorted by training images, most frequent first)")
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{n} {what} sorted by training images, most frequent first")


def _width_for(n: int) -> float:
    return float(min(24.0, max(8.0, 0.22 * n)))


_AP_KEYS = ("category_id", "name", "frequency", "train_images", "ap")


def per_category_ap_figure(rows: Sequence[Mapping], title: str = "") -> Figure:
    """The figure of :func:`plot_per_category_ap`, for callers that want it as an image."""
    for k, row in enumerate(rows):
        missing = [key for key in _AP_KEYS if key not in row]
        if missing:
            raise ValueError(f"per-category AP row {k} lacks {missing}; rows need {_AP_KEYS}")
    train = np.asarray([r["train_images"] for r in rows], dtype=np.int64)
    order = frequency_order(train, [r["category_id"] for r in rows])
    ap = np.asarray([float(r["ap"]) for r in rows], dtype=np.float64)[order]
    freq = _as_frequency([r["frequency"] for r in rows], len(rows))[order]
    names = [str(rows[i]["name"]) for i in order]
    train = train[order]
    n = len(rows)

    width = _width_for(n)
    fig = _new_figure(width, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    _shade_frequency_regions(ax, freq)
    x = np.arange(n)
    valid = np.isfinite(ap)
    # NaN (no ground truth in the evaluated split): no bar, a gap at that position.
    ax.bar(
        x[valid],
        ap[valid],
        width=0.8,
        color=[FREQUENCY_COLORS.get(f, _UNKNOWN_COLOR) for f in freq[valid]],
        zorder=2,
    )
    ax.set_ylim(0, 100)
    ax.set_ylabel("AP (%)")
    _category_axis(ax, n, names, "categories")

    # Training images on a log axis, so the x order can be read off the figure.
    twin = ax.twinx()
    shown = train > 0
    twin.plot(x[shown], train[shown], color="0.3", lw=1, marker="." if n <= 100 else None)
    if shown.any():
        twin.set_yscale("log")
    twin.set_ylabel("training images (log)", color="0.3")

    handles = []
    for f in ("f", "c", "r"):
        sel = freq == f
        if sel.any():
            mean = np.nanmean(ap[sel]) if np.isfinite(ap[sel]).any() else float("nan")
            handles.append(
                Patch(
                    color=FREQUENCY_COLORS[f],
                    label=f"{FREQUENCY_NAMES[f]}: {int(sel.sum())} classes, mean AP {mean:.1f}",
                )
            )
    if (~valid).any():
        handles.append(Patch(fill=False, lw=0, label=f"gap: no ground truth ({(~valid).sum()})"))
    handles.append(Line2D([], [], color="0.3", lw=1, label="training images"))
    # Above the axes (bars fill the plot), clear of the r/c/f names.
    ax.legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.06),
        ncol=3 if width >= 12 else 2,
        fontsize=8,
        frameon=False,
    )
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_per_category_ap(rows: Sequence[Mapping], path: str, title: str = "") -> str:
    """
    Bars of per-category AP, categories sorted by training images (most frequent first), with
    the r/c/f regions shaded and named, as in the Seesaw supplement's Figure A2.

    Args:
        rows: one dict per category with keys category_id, name, frequency ("r"/"c"/"f"),
            train_images (training images containing the class) and ap (in [0, 100], NaN when
            the class has no ground truth in the evaluated split; drawn as a gap).
        path: the PNG to write.

    Returns:
        path
    """
    return _save(per_category_ap_figure(rows, title), path)


def grad_ratio_figure(
    series: Mapping[str, np.ndarray],
    train_images,
    frequency=None,
    title: str = "",
    names: Optional[Sequence[str]] = None,
) -> Figure:
    """The figure of :func:`plot_grad_ratio`."""
    train = np.asarray(train_images, dtype=np.int64)
    n = len(train)
    order = frequency_order(train)
    freq = _as_frequency(frequency, n)[order]
    curves = {}
    for name, ratio in series.items():
        r = np.asarray(ratio, dtype=np.float64)
        if r.shape != (n,):
            raise ValueError(f"series {name!r} has shape {r.shape}; expected ({n},)")
        curves[name] = r[order]
    positive = [r[np.isfinite(r) & (r > 0)] for r in curves.values()]
    values = np.concatenate(positive) if positive else np.zeros(0)
    # The ratio spans orders of magnitude under CE (tail classes near 0): log axis then.
    log_y = values.size > 0 and values.max() / values.min() > 20.0

    fig = _new_figure(_width_for(n), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    _shade_frequency_regions(ax, freq)
    x = np.arange(n)
    for name, r in curves.items():
        ok = np.isfinite(r) & (r > 0) if log_y else np.isfinite(r)
        y = np.where(ok, r, np.nan)
        # Markers keep a finite value between two gaps visible.
        ax.plot(x, y, lw=1.2, marker=".", ms=4 if n <= 100 else 2, label=name, zorder=3)
    ax.axhline(1.0, color="0.4", lw=0.8, ls="--", zorder=1)
    if log_y:
        ax.set_yscale("log")
    ax.set_ylabel("cumulative positive / negative gradient")
    _category_axis(ax, n, None if names is None else [str(names[i]) for i in order], "categories")
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    if title:
        ax.set_title(title, pad=18)
    fig.tight_layout()
    return fig


def plot_grad_ratio(
    series: Mapping[str, np.ndarray],
    train_images,
    frequency,
    path: str,
    title: str = "",
    names: Optional[Sequence[str]] = None,
) -> str:
    """
    Ratio of cumulative positive to negative classification gradients per category, one line
    per model, categories sorted by training images (most frequent first), r/c/f regions shaded;
    the Seesaw supplement's Figure A1, where CE leaves tail classes with ratios near 0 and Seesaw
    brings them towards the head's. A log y-axis is used when the ratios span more than a factor
    of 20; classes without negative gradient (or, on a log axis, without positive) are gaps.

    Args:
        series: model name -> (C,) ratios.
        train_images: (C,) training images containing each class.
        frequency: (C,) "r"/"c"/"f" labels, or None.
        names: optional (C,) category names for the x-axis (shown up to 60 categories).

    Returns:
        path
    """
    return _save(grad_ratio_figure(series, train_images, frequency, title, names), path)


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
    freq = _as_frequency(frequency, C)
    idx = np.flatnonzero(seen)
    xy = tsne_embedding(means[idx], seed=seed)
    group_ids = np.unique(groups[idx])
    colors = dict(zip(group_ids.tolist(), _group_colors(len(group_ids))))

    fig = _new_figure(7.5, 6.5)
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
                [], [], ls="", marker=_FREQUENCY_MARKERS[f], color="0.5", label=FREQUENCY_NAMES[f]
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
    return _save(fasa_tsne_figure(means, seen, groups, frequency, seed, class_names), path)


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
    fig = _new_figure(2 * panel_w, panel_w * h / max(w, 1) + 0.6)
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
    return _save(fig, path)
