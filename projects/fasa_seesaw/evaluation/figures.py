# Copyright (c) fasa_seesaw contributors.
"""
Figures for long-tailed detection, written as PNG files:

- per-category AP with categories sorted by training frequency (Seesaw supplement, Figure A2);
- the ratio of cumulative positive to negative classification gradients per category (Seesaw
  supplement, Figure A1).

FASA's t-SNE and side-by-side figures live with their only user, ``tools/plot_figures.py``, in
``tools/figures_extra.py``, and are drawn with the helpers here.

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
from matplotlib.patches import Patch
from matplotlib.transforms import blended_transform_factory

__all__ = [
    "frequency_order",
    "figure_to_chw_uint8",
    "per_category_ap_figure",
    "plot_per_category_ap",
    "grad_ratio_figure",
    "plot_grad_ratio",
    "new_figure",
    "save",
    "as_frequency",
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


def new_figure(width: float, height: float) -> Figure:
    """An empty figure on its own Agg canvas (no pyplot)."""
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str) -> str:
    """Write ``fig`` to ``path`` as PNG (creating its folder); returns ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def as_frequency(frequency, n: int) -> np.ndarray:
    """(n,) r/c/f labels as strings; "?" for all when ``frequency`` is None."""
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
    freq = as_frequency([r["frequency"] for r in rows], len(rows))[order]
    names = [str(rows[i]["name"]) for i in order]
    train = train[order]
    n = len(rows)

    width = _width_for(n)
    fig = new_figure(width, 5.5)
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
    return save(per_category_ap_figure(rows, title), path)


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
    freq = as_frequency(frequency, n)[order]
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

    fig = new_figure(_width_for(n), 4.5)
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
    return save(grad_ratio_figure(series, train_images, frequency, title, names), path)
