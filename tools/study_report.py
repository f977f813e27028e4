# Copyright (c) fasa_seesaw contributors.
"""
The long-tail study's report (tools/longtail_study.py runs the study): from the runs' records
(tools/study_records.py), writes into the study folder

    results.json   raw per-run metrics (box and mask LVIS AP, APr, APc, APf, ...) and wall times
    table.md       mean ± std over seeds per config: box and mask AP, APr, APc, APf, and every
                   config's difference to the baseline
    groups.png     APr / APc / APf per config, box and mask, with std error bars
    ablations.md   the FASA supplement's ablations (Tables 1-4): ours beside the paper's

    python tools/study_report.py --records docs/study/records --split test --out docs/study
"""

import csv
import datetime
import json
import math
import numpy as np
import os
import platform
import sys
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from study_records import all_records  # noqa: E402  (tools/ is not a package)

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


def format_table(study, summary, info=None):
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
    if info:
        lines += [
            "",
            f"{info['runs']} runs from the records in `{info['records']}`; model code "
            + ", ".join(f"`{c[:12]}`" for c in info["code_commits"])
            + f". Machine time: {info['machine_s'] / 3600:.2f} h (run wall time x the share "
            f"of the {os.cpu_count()} cores each run used; {info['run_wall_s'] / 3600:.2f} h "
            "of run wall time).",
        ]
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


def rows_from_records(records_dir, eval_dataset):
    """One row per record with metrics for eval_dataset (the table's and results.json's)."""
    rows = []
    for path, rec in all_records(records_dir):
        metrics = rec["metrics"].get(eval_dataset)
        if not metrics:
            continue
        timing = rec["timing"]
        row = OrderedDict(
            config=rec["config"],
            config_file=rec["config_file"],
            seed=rec["seed"],
            record=os.path.relpath(path, ROOT),
            code_commit=rec["code_commit"],
            train_wall_s=timing["train_wall_s"],
            eval_only_wall_s=timing["eval_only_wall_s"],
            wall_s=round(timing["train_wall_s"] + timing["eval_only_wall_s"], 2),
            threads=timing.get("threads"),
        )
        for task, _ in TASKS:
            row[task] = metrics.get(task, {})
        row["rare_classes_with_ap"] = metrics.get("rare_classes_with_ap", {})
        passes = (rec.get("fasa") or {}).get("passes") or []
        if passes:
            row["fasa_passes"] = len({p["pass"] for p in passes})
            row["fasa_groups"] = [p["num_groups"] for p in passes if p["stage"] == 0]
            row["fasa_largest_group"] = [p["largest_group"] for p in passes if p["stage"] == 0]
        rows.append(row)
    return rows


def ordered_configs(rows, order=()):
    """Config names of the rows: those in `order` first, in its order, then the others sorted."""
    names = {r["config"] for r in rows}
    return [n for n in order if n in names] + sorted(names - set(order))


def machine_time(rows):
    """Seconds of the machine the runs took: each run's wall time x its share of the cores."""
    cores = os.cpu_count() or 1
    total = 0.0
    for r in rows:
        threads = max(int(t) for t in r["threads"]) if r.get("threads") else cores
        total += r["wall_s"] * min(threads, cores) / cores
    return total


# The FASA supplement's ablations: (title, [(config, our label, the paper's row)], the paper's
# column names, the metric our columns show). The paper's rows are copied from its tables.
MASK = ("AP", "APr", "APc", "APf")
ABLATIONS = [
    (
        "Table 2: initial draw probabilities (mask AP, %; paper: LVIS v1 val, Mask R-CNN R50)",
        [
            ("ce", "no FASA", ("22.3", "12.7", "21.7", "26.9")),
            ("fasa_uniform", "FASA, uniform", ("23.2", "15.1", "23.4", "26.6")),
            ("fasa", "FASA, inverse class frequency", ("23.7", "17.8", "22.9", "27.2")),
        ],
        ("AP", "APr", "APc", "APf"),
        ("segm", MASK),
    ),
    (
        "Table 3: adaptation signal (paper: CIFAR-100-LT accuracy, %, 3 runs)",
        [
            ("fasa", "validation loss", ("43.7 ± 0.25",)),
            ("fasa_metric", "validation metric (here: per-class box AP)", ("43.9 ± 0.38",)),
        ],
        ("accuracy",),
        ("segm", MASK),
    ),
    (
        "Table 4: group-wise vs class-wise adaptation (paper: CIFAR-100-LT accuracy, %, 3 runs)",
        [
            ("fasa", "group-wise (MeanShift)", ("43.7 ± 0.25",)),
            ("fasa_affinity", "group-wise (AffinityPropagation)", ("",)),
            ("fasa_classwise", "class-wise", ("43.3 ± 0.85",)),
        ],
        ("accuracy",),
        ("segm", MASK),
    ),
    (
        "Table 1: TIDE errors, dAP (%; paper: LVIS v1 val, Mask R-CNN; ours: mask, IoU 0.5)",
        [
            ("ce", "Mask R-CNN", ("25.10", "6.71", "0.59", "0.36", "3.17", "7.15")),
            ("fasa", "+ FASA", ("20.74", "6.80", "0.50", "0.41", "3.48", "7.29")),
        ],
        ("E_cls", "E_loc", "E_both", "E_dupe", "E_bkg", "E_miss"),
        ("segm", tuple(f"TIDE_{k}" for k in ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss"))),
    ),
]


def ablation_lines(rows):
    """Markdown: one small table per ablation, ours (mean ± std over seeds) beside the paper's."""
    lines = ["# The FASA supplement's ablations on the study regime", ""]
    for title, entries, paper_cols, (task, metrics) in ABLATIONS:
        head = ["config", "n"] + [f"ours {m}" for m in metrics]
        head += [f"paper {c}" for c in paper_cols]
        lines += [f"## {title}", "", *_md_head(head)]
        for name, label, paper in entries:
            mine = [r for r in rows if r["config"] == name]
            cells = [f"{label} (`{name}`)", str(len(mine))]
            for m in metrics:
                cells.append(
                    _cell(
                        dict(
                            zip(
                                ("mean", "std", "n"),
                                _mean_std([r.get(task, {}).get(m) for r in mine]),
                            )
                        )
                    )
                )
            lines.append("| " + " | ".join(cells + list(paper)) + " |")
        lines.append("")
    return lines


def fasa_pass_lines(rows):
    """Markdown: per FASA run, the groups its adaptation passes formed."""
    runs = [r for r in rows if r.get("fasa_passes")]
    if not runs:
        return []
    lines = [
        "",
        "FASA's adaptation per run: passes, then per pass the number of groups and the largest "
        "group's size (of the classes; stage 0).",
        "",
        *_md_head(["config", "seed", "passes", "groups per pass", "largest group per pass"]),
    ]
    for r in runs:
        lines.append(
            f"| `{r['config']}` | {r['seed']} | {r['fasa_passes']} | "
            + " ".join(map(str, r["fasa_groups"]))
            + " | "
            + " ".join(map(str, r["fasa_largest_group"]))
            + " |"
        )
    return lines


def write_outputs(study, order=None):
    """results.json, table.md and groups.png in study.out, from the records in
    study.records_dir that have metrics for study.eval_dataset. Returns the rows."""
    rows = rows_from_records(study.records_dir, study.eval_dataset)
    configs = ordered_configs(rows, order or getattr(study, "order", ()))
    summary = summarize(rows, configs)
    payload = OrderedDict(
        study=OrderedDict(
            train_dataset=study.train_dataset,
            eval_dataset=study.eval_dataset,
            num_classes=getattr(study, "num_classes", None),
            records=os.path.relpath(study.records_dir, ROOT),
            configs=configs,
            code_commits=sorted({r["code_commit"] for r in rows}),
            runs=len(rows),
            run_wall_s=round(sum(r["wall_s"] for r in rows), 1),
            machine_s=round(machine_time(rows), 1),
            command=study.command_line,
            machine=f"{platform.platform()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}",
            written=datetime.datetime.now().isoformat(timespec="seconds"),
        ),
        runs=rows,
        summary=summary,
        differences=differences(summary),
    )
    os.makedirs(study.out, exist_ok=True)
    with open(os.path.join(study.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    with open(os.path.join(study.out, "table.md"), "w", encoding="utf-8") as f:
        f.write(format_table(study, summary, payload["study"]))
        f.write("\n".join(fasa_pass_lines(rows)) + "\n")
    with open(os.path.join(study.out, "ablations.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(ablation_lines(rows)))
    if summary:
        plot_groups(study, summary, os.path.join(study.out, "groups.png"))
    return rows


def main(argv=None):
    """python tools/study_report.py --records docs/study/records --split test --out docs/study"""
    import argparse
    import shlex
    from types import SimpleNamespace

    ap = argparse.ArgumentParser(
        description="Rebuild the study's results.json, table.md and groups.png from its records."
    )
    ap.add_argument("--records", required=True, help="the records folder (<config>/seed<k>.json)")
    ap.add_argument("--out", required=True, help="where the three files go")
    ap.add_argument("--spec", default="study", help="built-in spec of the split (default study)")
    ap.add_argument("--split", choices=("val", "test"), default="test")
    ap.add_argument("--eval-dataset", default=None, help="a dataset name instead of --split")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.records):
        sys.exit(f"error: no records folder {args.records}")
    from longtail_study import MATRIX  # the table's order

    study = SimpleNamespace(
        out=args.out,
        records_dir=os.path.abspath(args.records),
        eval_dataset=args.eval_dataset or f"longtail_synth_{args.spec}_{args.split}",
        train_dataset=f"longtail_synth_{args.spec}_train",
        command_line=shlex.join(["python", "tools/study_report.py"] + sys.argv[1:]),
        order=list(MATRIX),
    )
    rows = write_outputs(study)
    print(f"[report] {len(rows)} records with metrics for {study.eval_dataset} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
