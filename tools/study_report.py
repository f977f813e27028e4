# Copyright (c) fasa_seesaw contributors.
"""
The long-tail study's report (tools/longtail_study.py runs the study): from the run folders'
metrics and records, writes into the study folder

    results.json   raw per-run metrics (box and mask LVIS AP, APr, APc, APf, ...) and wall times
    table.md       mean ± std over seeds per config: box and mask AP, APr, APc, APf, and every
                   config's difference to the baseline
    groups.png     APr / APc / APf per config, box and mask, with std error bars
"""

import csv
import datetime
import json
import math
import numpy as np
import os
import platform
from collections import OrderedDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = (("bbox", "box"), ("segm", "mask"))
BASELINE = "ce"  # the table's differences are taken against this config
METRICS = ("AP", "APr", "APc", "APf")
GROUPS = (("APr", "rare", "#c0392b"), ("APc", "common", "#e67e22"), ("APf", "frequent", "#2c7fb8"))


def load_metrics(path):
    """{"bbox": {...}, "segm": {...}} in percent; null (NaN) entries become None."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _mean_std(values):
    """(mean, sample std or None, n) over the non-missing values."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return None, None, 0
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return float(np.mean(vals)), std, len(vals)


def summarize(rows, configs):
    out = OrderedDict()
    for name in configs:
        mine = [r for r in rows if r["config"] == name]
        if not mine:
            continue
        entry = {"n": len(mine), "seeds": [r["seed"] for r in mine]}
        for task, _ in TASKS:
            entry[task] = {}
            for m in METRICS:
                mean, std, n = _mean_std([r.get(task, {}).get(m) for r in mine])
                entry[task][m] = {"mean": mean, "std": std, "n": n}
        entry["wall_s"] = _mean_std([r["wall_s"] for r in mine])[0]
        out[name] = entry
    return out


def _cell(stat):
    if stat["mean"] is None:
        return "n/a"
    if stat["std"] is None:
        return f"{stat['mean']:.2f}"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def format_table(study, summary):
    head = ["config", "n"]
    head += [f"{short} {m}" for _, short in TASKS for m in METRICS] + ["min/run"]
    lines = [
        f"# Long-tail study: trained on `{study.train_dataset}`, evaluated on "
        f"`{study.eval_dataset}`",
        "",
        "LVIS AP (%), mean ± sample standard deviation over seeds (n = finished runs; no ± for "
        "a single run). min/run: wall minutes per run, evaluation included.",
        "",
        *_md_head(head),
    ]
    for name, entry in summary.items():
        cells = [f"`{name}`", str(entry["n"])]
        cells += [_cell(entry[task][m]) for task, _ in TASKS for m in METRICS]
        cells.append(f"{entry['wall_s'] / 60:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    if not summary:
        lines.append("| (no finished runs) |" + " |" * (len(head) - 1))
    lines += compare_lines(summary)
    lines += ["", f"Command: `{study.command_line}`", ""]
    return "\n".join(lines)


def compare(a, b):
    """
    (difference of means b - a, spread, exceeds) for two summary stats; spread is the sum of the
    two sample standard deviations, and the difference exceeds it when the mean ± std intervals
    do not overlap. None without two seeds on both sides.
    """
    if a["mean"] is None or b["mean"] is None or a["std"] is None or b["std"] is None:
        return None
    diff, spread = b["mean"] - a["mean"], a["std"] + b["std"]
    return diff, spread, abs(diff) > spread


def differences(summary, baseline=BASELINE):
    """{config: {task: {metric: {diff, spread, exceeds}}}} against the baseline (json)."""
    if baseline not in summary:
        return {}
    out = OrderedDict()
    for name, entry in summary.items():
        if name == baseline:
            continue
        out[name] = {}
        for task, _ in TASKS:
            out[name][task] = {}
            for m in METRICS:
                c = compare(summary[baseline][task][m], entry[task][m])
                out[name][task][m] = (
                    None if c is None else {"diff": c[0], "spread": c[1], "exceeds": c[2]}
                )
    return out


def compare_lines(summary, baseline=BASELINE):
    """Markdown lines: every config against the baseline on APr, APc and APf (box and mask)."""
    if baseline not in summary or len(summary) < 2:
        return []
    head = ["config"] + [f"{short} {m}" for _, short in TASKS for m in METRICS[1:]]
    lines = [
        "",
        f"Difference to `{baseline}` (mean of config - mean of `{baseline}`), with the seed "
        "spread (sum of the two standard deviations) in brackets; **bold** when the difference "
        "exceeds the spread (the mean ± std intervals do not overlap).",
        "",
        *_md_head(head),
    ]
    for name, by_task in differences(summary, baseline).items():
        cells = [f"`{name}`"]
        for task, _ in TASKS:
            for m in METRICS[1:]:
                c = by_task[task][m]
                if c is None:
                    cells.append("n/a")
                    continue
                text = f"{c['diff']:+.2f} ({c['spread']:.2f})"
                cells.append(f"**{text}**" if c["exceeds"] else text)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _md_head(head):
    """A markdown table's header and alignment rows: first column left, the rest right."""
    return [
        "| " + " | ".join(head) + " |",
        "| --- | " + " | ".join("---:" for _ in head[1:]) + " |",
    ]


def plot_groups(study, summary, path):
    """Grouped bars: APr/APc/APf per config, box and mask panels, std error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(summary)
    fig = Figure(figsize=(max(6.0, 1.3 * len(names) + 2.0), 7.0), dpi=120)
    FigureCanvasAgg(fig)
    x = np.arange(len(names))
    width = 0.26
    for i, (task, short) in enumerate(TASKS):
        ax = fig.add_subplot(2, 1, i + 1)
        for j, (metric, label, colour) in enumerate(GROUPS):
            stats = [summary[n][task][metric] for n in names]
            means = [np.nan if s["mean"] is None else s["mean"] for s in stats]
            errs = [np.nan if s["std"] is None else s["std"] for s in stats]  # n = 1: no bar
            ax.bar(
                x + (j - 1) * width,
                means,
                width,
                yerr=errs,
                capsize=3,
                color=colour,
                label=f"{metric} ({label})",
            )
        ax.set_xticks(x)
        ax.set_xticklabels([f"{n} (n={summary[n]['n']})" for n in names], rotation=20, ha="right")
        top = ax.get_ylim()[1]
        ax.set_ylim(0, 1.25 * top if np.isfinite(top) and top > 0 else 1.0)  # room for the legend
        ax.set_ylabel(f"{short} AP (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        if i == 0:
            ax.set_title(
                f"{study.eval_dataset}: AP per frequency group, mean ± std over seeds", fontsize=10
            )
            ax.legend(fontsize=8, ncol=3, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    return path


def rare_classes_with_ap(folder):
    """
    {task: [rare classes with AP > 0, rare classes with an AP]} from the per-category CSVs the
    evaluation wrote next to lvis_metrics.json ({} when there are none).
    """
    out = {}
    for task, _ in TASKS:
        path = os.path.join(folder, f"per_category_ap_{task}.csv")
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", newline="") as f:
            rare = [r["ap"] for r in csv.DictReader(f) if r.get("frequency") == "r"]
        values = [float(v) for v in rare if v not in ("", "nan", "NaN")]
        values = [v for v in values if not math.isnan(v)]
        out[task] = [sum(v > 0 for v in values), len(values)]
    return out


def write_outputs(study, runs):
    rows = []
    for run in runs:
        path = run.metrics_file()
        if path is None:
            continue
        train_s, eval_s = run.wall_times()
        try:
            metrics = load_metrics(path)
        except ValueError:  # still being written by a run evaluating now (--jobs): next time
            continue
        row = OrderedDict(
            config=run.name,
            config_file=os.path.relpath(run.config_file, ROOT),
            seed=run.seed,
            output_dir=run.dir,
            metrics_file=path,
            train_wall_s=round(train_s, 2),
            eval_only_wall_s=round(eval_s, 2),
            wall_s=round(train_s + eval_s, 2),
        )
        for task, _ in TASKS:
            row[task] = metrics.get(task, {})
        row["rare_classes_with_ap"] = rare_classes_with_ap(os.path.dirname(path))
        rows.append(row)
    summary = summarize(rows, study.configs)
    payload = OrderedDict(
        study=OrderedDict(
            train_dataset=study.train_dataset,
            eval_dataset=study.eval_dataset,
            num_classes=study.num_classes,
            configs=study.configs,
            seeds=study.seeds,
            iters=study.iters,
            opts=study.opts,
            jobs=study.jobs,
            command=study.command_line,
            machine=f"{platform.platform()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}",
            written=datetime.datetime.now().isoformat(timespec="seconds"),
        ),
        runs=rows,
        summary=summary,
        differences=differences(summary),
    )
    with open(os.path.join(study.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    with open(os.path.join(study.out, "table.md"), "w", encoding="utf-8") as f:
        f.write(format_table(study, summary))
    if summary:
        plot_groups(study, summary, os.path.join(study.out, "groups.png"))
    return rows
