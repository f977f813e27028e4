#!/usr/bin/env python
# Copyright (c) fasa_seesaw contributors.
"""
The long-tail study: train and evaluate a matrix of configs x seeds with train_net.py (one run at
a time, in subprocesses), then write into --out:

    results.json   raw per-run metrics (box and mask LVIS AP, APr, APc, APf, ...) and wall times
    table.md       mean ± std over seeds per config: box and mask AP, APr, APc, APf
    groups.png     APr / APc / APf per config, box and mask, with std error bars

Examples:
    python tools/longtail_study.py --out output/study                  # tune on the val split
    python tools/longtail_study.py --out output/study --split test     # the final table
    python tools/longtail_study.py --out output/s --configs ce seesaw --seeds 0 --iters 50
    python tools/longtail_study.py --out output/study --dry-run         # print the commands
    python tools/longtail_study.py --out output/mine --train-dataset my_train \\
        --eval-dataset my_val --opts INPUT.MIN_SIZE_TEST 256 INPUT.MAX_SIZE_TEST 256

Each run trains into <out>/runs/<config>/seed<k>/ and is evaluated there by train_net.py
(<run>/inference/<dataset>/lvis_metrics.json). Running the command again resumes the study:
  - a run with metrics for the evaluation dataset is skipped;
  - a trained run (model_final.pth) without them is only evaluated (--eval-only), so the final
    `--split test` table reuses the models trained for the val table;
  - a run stopped after a checkpoint continues with train_net.py --resume (exact resume);
  - a run stopped before any checkpoint is moved aside to seed<k>.failed-<n> and started afresh.
The three files are views of the run folders: they are rewritten after every run, for the
evaluation dataset of the current command.
"""

import argparse
import concurrent.futures
import csv
import datetime
import glob
import json
import math
import numpy as np
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from collections import OrderedDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs", "study")
TRAIN_NET = os.path.join(ROOT, "train_net.py")

# The matrix: name -> config file under configs/study/.
MATRIX = OrderedDict(
    [
        ("ce", "mask_rcnn_R_18_FPN_ce_study.yaml"),
        ("rfs", "mask_rcnn_R_18_FPN_ce_rfs_study.yaml"),
        ("seesaw", "mask_rcnn_R_18_FPN_seesaw_study.yaml"),
        ("seesaw_normed_mask", "mask_rcnn_R_18_FPN_seesaw_normed_mask_study.yaml"),
        ("fasa", "mask_rcnn_R_18_FPN_fasa_study.yaml"),
        ("fasa_seesaw", "mask_rcnn_R_18_FPN_fasa_seesaw_study.yaml"),
        ("fasa_rfs", "mask_rcnn_R_18_FPN_fasa_rfs_study.yaml"),
    ]
)
TASKS = (("bbox", "box"), ("segm", "mask"))
BASELINE = "ce"  # the table's differences are taken against this config
METRICS = ("AP", "APr", "APc", "APf")
GROUPS = (("APr", "rare", "#c0392b"), ("APc", "common", "#e67e22"), ("APf", "frequent", "#2c7fb8"))
# Keys the study sets itself; --opts may not override them.
MANAGED_KEYS = {
    "SEED": "--seeds",
    "OUTPUT_DIR": "--out",
    "DATASETS.TRAIN": "--train-dataset / --spec",
    "DATASETS.TEST": "--eval-dataset / --split",
    "MODEL.ROI_HEADS.NUM_CLASSES": "--num-classes",
    "MODEL.WEIGHTS": "(the study trains from scratch)",
}


class StudyError(Exception):
    """Bad input; printed as one line, without a traceback."""


# ---------------------------------------------------------------------------------------------
# Arguments and datasets
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Matrix: " + ", ".join(MATRIX),
    )
    ap.add_argument("--out", required=True, help="study folder (runs, results, table, plot)")
    ap.add_argument(
        "--configs", nargs="+", default=list(MATRIX), metavar="NAME", help="subset of the matrix"
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="default: 0 1 2")
    ap.add_argument(
        "--spec",
        default="study",
        help="built-in synthetic dataset: trains on longtail_synth_<spec>_train and evaluates on "
        "longtail_synth_<spec>_<split> (default: study)",
    )
    ap.add_argument(
        "--split",
        choices=("val", "test"),
        default=None,
        help="evaluation split of --spec (default: val; use test for the final table only)",
    )
    ap.add_argument(
        "--train-dataset", default=None, help="any registered dataset (overrides --spec)"
    )
    ap.add_argument(
        "--eval-dataset", default=None, help="any registered dataset (overrides --spec)"
    )
    ap.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="MODEL.ROI_HEADS.NUM_CLASSES (default: from the training dataset's metadata)",
    )
    ap.add_argument(
        "--iters",
        type=int,
        default=None,
        help="shorten or lengthen the schedule to this many iterations; LR steps, warm-up and "
        "FASA's warm-up and adaptation period scale with it (for smoke tests)",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time, each with cpu_count // jobs threads (default 1). On 2 CPU cores, "
        "--jobs 2 (two single-threaded runs) trains ~1.4x faster than one two-threaded run",
    )
    ap.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    ap.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        metavar="KEY VALUE",
        help="extra config options for every run, passed to train_net.py (must come last)",
    )
    args = ap.parse_args(argv)

    unknown = [c for c in args.configs if c not in MATRIX]
    if unknown:
        raise StudyError(f"unknown config {unknown[0]!r}; choose from: {', '.join(MATRIX)}")
    args.configs = list(OrderedDict.fromkeys(args.configs))
    args.seeds = list(OrderedDict.fromkeys(args.seeds))
    if args.jobs < 1:
        raise StudyError(f"--jobs must be >= 1; got {args.jobs}")
    if args.iters is not None and args.iters < 2:
        raise StudyError(f"--iters must be >= 2; got {args.iters}")
    if args.num_classes is not None and args.num_classes < 1:
        raise StudyError(f"--num-classes must be >= 1; got {args.num_classes}")
    if len(args.opts) % 2:
        raise StudyError(f"--opts needs KEY VALUE pairs; got {len(args.opts)} items")
    for key in args.opts[::2]:
        if key in MANAGED_KEYS:
            raise StudyError(
                f"--opts may not set {key}: the study sets it (use {MANAGED_KEYS[key]})"
            )
    if args.split and args.eval_dataset:
        raise StudyError("--split picks a split of --spec; with --eval-dataset, name the split")
    args.out = os.path.abspath(args.out)
    return args


def resolve_datasets(args):
    """Returns (train dataset, eval dataset, num classes), all checked against the registry."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    import fasa_seesaw.data  # noqa: F401  (registers the built-in datasets)
    from fasa_seesaw.data import builtin_dataset_name
    from fasa_seesaw.data.synth import SPECS, spec_splits

    split = args.split or "val"
    if not (args.train_dataset and args.eval_dataset):
        if args.spec not in SPECS:
            raise StudyError(f"unknown --spec {args.spec!r}; built-in specs: {', '.join(SPECS)}")
        spec = SPECS[args.spec]
        if not args.eval_dataset and split not in spec_splits(spec):
            raise StudyError(
                f"spec {args.spec!r} has no {split} split (its splits: "
                f"{', '.join(spec_splits(spec))}); use --split val or another --spec"
            )
    train = args.train_dataset or builtin_dataset_name(args.spec, "train")
    evaluate = args.eval_dataset or builtin_dataset_name(args.spec, split)
    registered = set(DatasetCatalog.list())
    for name in (train, evaluate):
        if name not in registered:
            synth = sorted(n for n in registered if n.startswith("longtail_synth_"))
            raise StudyError(
                f"unknown dataset {name!r}: it is not registered with detectron2 (built-in "
                f"long-tailed ones: {', '.join(synth)}; register your own LVIS json with "
                "fasa_seesaw.data.register_lvis_json_dataset)"
            )

    def classes(name):
        try:
            return MetadataCatalog.get(name).get("thing_classes", None)
        except Exception:  # a registry entry whose metadata cannot be built
            return None

    num_classes = args.num_classes
    if num_classes is None:
        known = classes(train)
        if not known:
            raise StudyError(f"cannot tell how many classes {train!r} has; pass --num-classes")
        num_classes = len(known)
    for name in (train, evaluate):
        known = classes(name)
        if known and len(known) != num_classes:
            raise StudyError(
                f"dataset {name!r} has {len(known)} classes but the study uses {num_classes} "
                "(--num-classes or the training dataset's)"
            )
    return train, evaluate, num_classes


def load_config(path):
    from detectron2.config import get_cfg

    from fasa_seesaw import add_fasa_seesaw_config

    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    cfg.merge_from_file(path)
    return cfg


def schedule_opts(cfg, iters):
    """Config options that stretch the config's schedule to `iters` iterations."""
    base = cfg.SOLVER.MAX_ITER

    def scale(v):
        return max(1, int(round(v * iters / base)))

    steps = sorted({min(scale(s), iters - 1) for s in cfg.SOLVER.STEPS if s < base})
    opts = ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", _tuple(steps)]
    opts += ["SOLVER.WARMUP_ITERS", str(min(scale(cfg.SOLVER.WARMUP_ITERS), iters))]
    if cfg.MODEL.FASA.WARMUP_ITERS > 0:
        opts += ["MODEL.FASA.WARMUP_ITERS", str(scale(cfg.MODEL.FASA.WARMUP_ITERS))]
    if cfg.MODEL.FASA.ADAPT.PERIOD > 0:
        opts += ["MODEL.FASA.ADAPT.PERIOD", str(scale(cfg.MODEL.FASA.ADAPT.PERIOD))]
    if cfg.FASA_SEESAW.PROGRESS_PERIOD > 0:
        opts += ["FASA_SEESAW.PROGRESS_PERIOD", str(scale(cfg.FASA_SEESAW.PROGRESS_PERIOD))]
    return opts


def _tuple(values):
    return "(" + "".join(f"{v}," for v in values) + ")"


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


class Run:
    """One (config, seed) cell of the matrix and its folder."""

    def __init__(self, study, name, seed):
        self.study, self.name, self.seed = study, name, seed
        self.config_file = os.path.join(CONFIG_DIR, MATRIX[name])
        self.dir = os.path.join(study.out, "runs", name, f"seed{seed}")
        self.record_file = os.path.join(self.dir, "study_run.json")

    @property
    def label(self):
        return f"{self.name} seed {self.seed}"

    def metrics_file(self):
        """The newest lvis_metrics.json for the study's evaluation dataset, or None."""
        ds = self.study.eval_dataset
        found = glob.glob(os.path.join(self.dir, "inference", ds, "lvis_metrics.json"))
        found += glob.glob(
            os.path.join(self.dir, "eval", ds, "*", "inference", ds, "lvis_metrics.json")
        )
        return max(found, key=os.path.getmtime) if found else None

    def action(self):
        """skip | evaluate | resume | restart | train."""
        if self.metrics_file():
            return "skip"
        if os.path.isfile(os.path.join(self.dir, "model_final.pth")):
            return "evaluate"
        if os.path.isfile(os.path.join(self.dir, "last_checkpoint")):
            return "resume"
        if os.path.isdir(self.dir) and os.listdir(self.dir):
            return "restart"
        return "train"

    def command(self, action):
        s = self.study
        data = [
            "DATASETS.TRAIN", f"('{s.train_dataset}',)",
            "DATASETS.TEST", f"('{s.eval_dataset}',)",
            "MODEL.ROI_HEADS.NUM_CLASSES", str(s.num_classes),
        ]  # fmt: skip
        cmd = [sys.executable, TRAIN_NET, "--config-file", self.config_file]
        out, extra = self.dir, []
        if action == "evaluate":
            cmd.append("--eval-only")
            # train_net.py adds eval_<time> to OUTPUT_DIR: nothing earlier is overwritten.
            out = os.path.join(self.dir, "eval", s.eval_dataset)
            extra = ["MODEL.WEIGHTS", os.path.join(self.dir, "model_final.pth")]
        elif action == "resume":
            cmd.append("--resume")
        opts = ["SEED", str(self.seed), "OUTPUT_DIR", out] + data + s.schedule[self.name]
        return cmd + opts + s.opts + extra

    def record(self):
        try:
            with open(self.record_file, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {"config": self.name, "seed": self.seed, "attempts": []}

    def add_attempt(self, attempt):
        rec = self.record()
        rec["attempts"].append(attempt)
        os.makedirs(self.dir, exist_ok=True)
        # Written to a temporary file and renamed: another thread may read it (--jobs).
        tmp = self.record_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(rec, f, indent=2)
        os.replace(tmp, self.record_file)

    def wall_times(self):
        """(training wall s, all attempts; eval-only wall s, successful ones on this dataset)."""
        attempts = self.record()["attempts"]
        train = sum(a["wall_s"] for a in attempts if a["action"] in ("train", "resume", "restart"))
        evaluate = sum(
            a["wall_s"]
            for a in attempts
            if a["action"] == "evaluate"
            and a["eval_dataset"] == self.study.eval_dataset
            and a["returncode"] == 0
        )
        return train, evaluate

    def move_aside(self):
        n = 1
        while os.path.exists(f"{self.dir}.failed-{n}"):
            n += 1
        os.rename(self.dir, f"{self.dir}.failed-{n}")
        return f"{self.dir}.failed-{n}"


def load_metrics(path):
    """{"bbox": {...}, "segm": {...}} in percent; null (NaN) entries become None."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# Child processes alive now, so an interrupt stops all of them (--jobs > 1).
_LIVE = set()
# Guards _LIVE and _STOP: once the study stops, no new child starts.
_LIVE_LOCK = threading.Lock()
_STOP = threading.Event()


def stop_children(timeout=30.0):
    """Stops every running child (terminate, then kill after `timeout`); no new one starts."""
    with _LIVE_LOCK:
        _STOP.set()
        procs = list(_LIVE)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def thread_env(jobs):
    """Environment for a run when `jobs` runs share the machine: cpu_count // jobs threads each.

    With --jobs 1 the environment is left as it is (torch's own default).
    """
    env = dict(os.environ)
    if jobs > 1:
        threads = str(max(1, (os.cpu_count() or 1) // jobs))
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[key] = threads
    return env


def execute(run, action, progress, env=None):
    """Runs one train_net.py command; its output goes to <run>/study_log.txt. Returns the rc."""
    if action == "restart":
        print(f"[study] {run.label}: unfinished without a checkpoint; moved to {run.move_aside()}")
    os.makedirs(run.dir, exist_ok=True)
    cmd = run.command(action)
    log_path = os.path.join(run.dir, "study_log.txt")
    start, started = time.perf_counter(), datetime.datetime.now().isoformat(timespec="milliseconds")
    rc = None
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n===== {started} {action}: {shlex.join(cmd)}\n")
        log.flush()
        with _LIVE_LOCK:
            if _STOP.is_set():
                return None  # the study is stopping: start nothing new
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
            _LIVE.add(proc)
        try:
            for line in proc.stdout:
                log.write(line)
                if line.startswith("[progress]"):
                    print(f"  {run.label}: {line[len('[progress] '):].rstrip()} | {progress}")
                    sys.stdout.flush()
            rc = proc.wait()
        except KeyboardInterrupt:
            stop_children()
            raise
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)
            run.add_attempt(
                {
                    "action": action,
                    "eval_dataset": run.study.eval_dataset,
                    "started": started,
                    "wall_s": round(time.perf_counter() - start, 2),
                    "returncode": rc,
                    "threads": (env or os.environ).get("OMP_NUM_THREADS"),
                    "command": cmd,
                }
            )
    if rc != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read().splitlines()[-15:]
        print(f"[study] FAILED {run.label} (exit {rc}); last lines of {log_path}:")
        print("\n".join("    " + t for t in tail))
    return rc


# ---------------------------------------------------------------------------------------------
# Results: json, table, plot
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------


class Study:
    def __init__(self, args, train_dataset, eval_dataset, num_classes):
        self.out = args.out
        self.configs, self.seeds = args.configs, args.seeds
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.num_classes, self.iters, self.opts = num_classes, args.iters, list(args.opts)
        self.jobs = args.jobs
        self.command_line = shlex.join(["python", "tools/longtail_study.py"] + sys.argv[1:])
        self.schedule = {
            name: (
                schedule_opts(load_config(os.path.join(CONFIG_DIR, MATRIX[name])), args.iters)
                if args.iters
                else []
            )
            for name in self.configs
        }
        # Seed-major: a study stopped part-way has whole seeds of the matrix.
        self.runs = [Run(self, name, seed) for seed in self.seeds for name in self.configs]

    def settings(self):
        """What makes a trained model; the evaluation dataset may change between commands."""
        return {
            "train_dataset": self.train_dataset,
            "num_classes": self.num_classes,
            "iters": self.iters,
            "opts": self.opts,
        }

    def check_settings(self):
        path = os.path.join(self.out, "study.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            diff = [k for k, v in self.settings().items() if old.get(k) != v]
            if diff:
                k = diff[0]
                raise StudyError(
                    f"{self.out} holds a study trained with other settings ({k}: "
                    f"{old.get(k)!r}, now {self.settings()[k]!r}); use another --out, or the "
                    "same settings to resume it"
                )
        else:
            os.makedirs(self.out, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(self.settings(), f, indent=2)


def _duration(seconds):
    return str(datetime.timedelta(seconds=int(round(seconds))))


def run_study(args):
    train, evaluate, num_classes = resolve_datasets(args)
    study = Study(args, train, evaluate, num_classes)
    plan = [(run, run.action()) for run in study.runs]
    total = len(plan)
    print(
        f"[study] {len(study.configs)} configs x {len(study.seeds)} seeds = {total} runs; "
        f"train {train}, evaluate {evaluate}, {num_classes} classes; out {study.out}"
    )
    if args.dry_run:
        for run, action in plan:
            print(f"[{action}] {run.label}")
            if action != "skip":
                print("    " + shlex.join(run.command(action)))
        return 0

    study.check_settings()
    todo = [(run, action) for run, action in plan if action != "skip"]
    done = total - len(todo)
    if done:
        print(f"[study] skipping {done} finished runs (metrics for {evaluate} exist)")
    if todo:
        from fasa_seesaw.data import prepare_datasets

        # Built-in data is generated once here, so no run's wall time includes it.
        print("[study] preparing datasets (the first use of a built-in one generates it)")
        prepare_datasets([train, evaluate])

    durations = [sum(r.wall_times()) for r, a in plan if a == "skip" and sum(r.wall_times()) > 0]
    failed = []
    env = thread_env(args.jobs)
    if args.jobs > 1:
        print(f"[study] {args.jobs} runs at a time, {env['OMP_NUM_THREADS']} thread(s) each")
    state = {"done": done, "started": 0}
    lock = threading.Lock()

    def one(run, action):
        with lock:
            left = len(todo) - state["started"]
            state["started"] += 1
            rounds = math.ceil(left / args.jobs)
            eta = f"ETA {_duration(np.mean(durations) * rounds)}" if durations else "ETA unknown"
            progress = f"{state['done']}/{total} runs done, {eta}"
            print(f"[study] {state['done']}/{total} done | {eta} | next: {run.label} ({action})")
        start = time.perf_counter()
        rc = execute(run, action, progress, env)
        with lock:
            if rc == 0 and run.metrics_file() is None:
                print(
                    f"[study] FAILED {run.label}: train_net.py wrote no lvis_metrics.json (no "
                    f"detections?); see {os.path.join(run.dir, 'study_log.txt')}"
                )
                rc = 1
            if rc != 0:
                failed.append(run.label)
                return
            elapsed = time.perf_counter() - start
            if action != "evaluate":
                durations.append(sum(run.wall_times()))
            state["done"] += 1
            m = load_metrics(run.metrics_file())
            summary = "  ".join(
                f"{short} AP {_fmt(m.get(task, {}).get('AP'))} "
                f"APr {_fmt(m.get(task, {}).get('APr'))}"
                for task, short in TASKS
            )
            print(f"[study] finished {run.label} in {_duration(elapsed)}: {summary}")
            write_outputs(study, study.runs)

    if args.jobs == 1:
        for run, action in todo:
            one(run, action)
    else:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs)
        try:
            futures = [pool.submit(one, run, action) for run, action in todo]
            for fut in futures:
                while True:  # short waits, so Ctrl-C reaches the main thread
                    try:
                        fut.result(timeout=1.0)
                        break
                    except concurrent.futures.TimeoutError:
                        continue
        except BaseException:
            # Ctrl-C or an error in a run's bookkeeping: queued runs must not go on running.
            pool.shutdown(wait=False, cancel_futures=True)
            stop_children()
            raise
        pool.shutdown()
    rows = write_outputs(study, study.runs)
    print(
        f"[study] {len(rows)}/{total} runs have metrics; wrote results.json, table.md"
        + (", groups.png" if rows else "")
        + f" in {study.out}"
    )
    if failed:
        print(f"[study] {len(failed)} runs failed: {', '.join(failed)}; run again to retry them")
        return 1
    return 0


def _fmt(v):
    return "n/a" if v is None else f"{v:.2f}"


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up at once, even in a pipe
    try:
        args = parse_args(argv)
        return run_study(args)
    except StudyError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; run the same command again to resume the study")


if __name__ == "__main__":
    sys.exit(main())
