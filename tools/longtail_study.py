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
A second stage (seesaw_dual_head: the dual-head classifier) starts from its first stage's run of
the same seed in the same --out (MODEL.WEIGHTS = <out>/runs/seesaw/seed<k>/model_final.pth):
with both in --configs the first trains first (with --jobs, the second waits for it); alone, the
first stage's trained folder and record must be there. Its record's key holds the first stage's
key, so a first stage trained again makes the second stale.
The three files are views of the run folders: they are rewritten after every run, for the
evaluation dataset of the current command.
"""

import argparse
import concurrent.futures
import datetime
import glob
import json
import math
import numpy as np
import os
import shlex
import sys
import threading
import time
from collections import OrderedDict

from study_records import (
    MODEL_CODE_PATHS,
    code_commit,
    commit_record,
    config_sha1,
    dataset_identity,
    write_record,
)
from study_report import TASKS, load_metrics, write_outputs
from study_runs import Run, execute, stop_children, thread_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs", "study")

# Every config of the study: name -> config file under configs/study/.
MATRIX = OrderedDict(
    [
        ("ce", "mask_rcnn_R_18_FPN_ce_study.yaml"),
        ("rfs", "mask_rcnn_R_18_FPN_ce_rfs_study.yaml"),
        ("seesaw", "mask_rcnn_R_18_FPN_seesaw_study.yaml"),
        ("seesaw_normed_mask", "mask_rcnn_R_18_FPN_seesaw_normed_mask_study.yaml"),
        ("fasa", "mask_rcnn_R_18_FPN_fasa_study.yaml"),
        ("fasa_seesaw", "mask_rcnn_R_18_FPN_fasa_seesaw_study.yaml"),
        ("ce_heldout", "mask_rcnn_R_18_FPN_ce_heldout_study.yaml"),
        ("seesaw_heldout", "mask_rcnn_R_18_FPN_seesaw_heldout_study.yaml"),
        ("fasa_uniform", "mask_rcnn_R_18_FPN_fasa_uniform_study.yaml"),
        ("fasa_metric", "mask_rcnn_R_18_FPN_fasa_metric_study.yaml"),
        ("fasa_affinity", "mask_rcnn_R_18_FPN_fasa_affinity_study.yaml"),
        ("fasa_classwise", "mask_rcnn_R_18_FPN_fasa_classwise_study.yaml"),
        ("fasa_static", "mask_rcnn_R_18_FPN_fasa_static_study.yaml"),
        ("fasa_seesaw_static", "mask_rcnn_R_18_FPN_fasa_seesaw_static_study.yaml"),
        ("fasa_seesaw_uniform", "mask_rcnn_R_18_FPN_fasa_seesaw_uniform_study.yaml"),
        ("fasa_seesaw_light", "mask_rcnn_R_18_FPN_fasa_seesaw_light_study.yaml"),
        ("fasa_rfs", "mask_rcnn_R_18_FPN_fasa_rfs_study.yaml"),
        ("nr", "mask_rcnn_R_18_FPN_nr_study.yaml"),
        ("fasa_nr", "mask_rcnn_R_18_FPN_fasa_nr_study.yaml"),
        ("eql", "mask_rcnn_R_18_FPN_eql_study.yaml"),
        ("eqlv2", "mask_rcnn_R_18_FPN_eqlv2_study.yaml"),
        ("fasa_smote", "mask_rcnn_R_18_FPN_fasa_smote_study.yaml"),
        ("fasa_moex", "mask_rcnn_R_18_FPN_fasa_moex_study.yaml"),
        ("seesaw_dual_head", "mask_rcnn_R_18_FPN_seesaw_dual_head_study.yaml"),
        ("cascade_seesaw", "cascade_mask_rcnn_R_18_FPN_seesaw_study.yaml"),
        ("htc_lite_seesaw", "htc_lite_R_18_FPN_seesaw_study.yaml"),
    ]
)
# Second stages: config -> the config whose run of the same seed, in the same --out, it starts
# from (MODEL.WEIGHTS). With both in --configs the first stage trains first; with the second
# stage alone, the first stage's trained folder and its record must be there already.
STARTS_FROM = {"seesaw_dual_head": "seesaw"}
# Names for parts of it, usable in --configs.
GROUPS = OrderedDict(
    [
        ("matrix", ["ce", "rfs", "seesaw", "seesaw_normed_mask", "fasa", "fasa_seesaw"]),
        ("controls", ["ce_heldout", "seesaw_heldout"]),
        ("ablations", ["fasa_uniform", "fasa_metric", "fasa_affinity", "fasa_classwise"]),
        ("diagnosis", ["fasa_static", "fasa_seesaw_static"]),
        ("interplay", ["fasa_seesaw_uniform", "fasa_seesaw_light"]),
        ("toolkit", ["nr", "fasa_nr", "eql", "eqlv2", "fasa_smote", "fasa_moex"]),
        ("htc", ["cascade_seesaw", "htc_lite_seesaw"]),
        ("all", list(MATRIX)),
    ]
)
# Keys the study sets itself; --opts may not override them.
MANAGED_KEYS = {
    "SEED": "--seeds",
    "OUTPUT_DIR": "--out",
    "DATASETS.TRAIN": "--train-dataset / --spec",
    "DATASETS.TEST": "--eval-dataset / --split",
    "MODEL.ROI_HEADS.NUM_CLASSES": "--num-classes",
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
        "--configs",
        nargs="+",
        default=["matrix"],
        metavar="NAME",
        help="configs or groups of them ("
        + "; ".join(f"{g}: {' '.join(c)}" for g, c in list(GROUPS.items())[:-1])
        + "; all; default: matrix)",
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
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=JSON:IMAGE_ROOT",
        help="register an LVIS-format dataset (repeatable), here and in every train_net.py run; "
        "then name it in --train-dataset / --eval-dataset",
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
    ap.add_argument(
        "--records",
        default=None,
        metavar="DIR",
        help="where each finished run's record goes (<DIR>/<config>/seed<k>.json; default "
        "<out>/records). A run whose record has the current key (config, seed, model-code "
        "commit, dataset, settings) and metrics for the evaluation split is skipped",
    )
    ap.add_argument(
        "--commit-records",
        action="store_true",
        help="git-commit each record as soon as its run ends (needs committed model code)",
    )
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no run that would end later than this many minutes after the start "
        "(estimated from finished runs); the rest waits for the next command",
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

    unknown = [c for c in args.configs if c not in MATRIX and c not in GROUPS]
    if unknown:
        raise StudyError(
            f"unknown config {unknown[0]!r}; choose from: {', '.join(MATRIX)} or a group "
            f"({', '.join(GROUPS)})"
        )
    names = list(OrderedDict.fromkeys(n for c in args.configs for n in GROUPS.get(c, [c])))
    for child, parent in STARTS_FROM.items():  # a first stage trains before its second
        if child in names and parent in names[names.index(child) :]:
            names.remove(child)
            names.insert(names.index(parent) + 1, child)
    args.configs = names
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise StudyError(f"--max-minutes must be > 0; got {args.max_minutes}")
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
    args.records = os.path.abspath(args.records or os.path.join(args.out, "records"))
    return args


def resolve_datasets(args):
    """Returns (train dataset, eval dataset, num classes), all checked against the registry."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    import fasa_seesaw.data  # noqa: F401  (registers the built-in datasets)
    from fasa_seesaw import ConfigError
    from fasa_seesaw.data import builtin_dataset_name, register_dataset_args
    from fasa_seesaw.data.synth import SPECS, spec_splits

    try:
        register_dataset_args(args.dataset)
    except ConfigError as e:
        raise StudyError(str(e)) from None

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
    if args.eval_dataset:
        evaluations = [evaluate]
    else:  # every evaluation split of the spec: tune on val and report test from one training
        evaluations = [
            builtin_dataset_name(args.spec, s)
            for s in spec_splits(SPECS[args.spec])
            if s != "train"
        ]
    registered = set(DatasetCatalog.list())
    for name in [train] + evaluations:
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
    for name in [train] + evaluations:
        known = classes(name)
        if known and len(known) != num_classes:
            raise StudyError(
                f"dataset {name!r} has {len(known)} classes but the study uses {num_classes} "
                "(--num-classes or the training dataset's)"
            )
    return train, evaluate, evaluations, num_classes


def load_config(path):
    from detectron2.config import get_cfg

    from fasa_seesaw import add_fasa_seesaw_config
    from fasa_seesaw.config import merge_config

    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    return merge_config(cfg, path)  # a renamed key: an error naming the new one


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
# The study
# ---------------------------------------------------------------------------------------------


def _absolute(spec):
    """NAME=JSON:IMAGE_ROOT with both paths made absolute."""
    name, _, paths = spec.partition("=")
    json_file, _, image_root = paths.partition(":")
    return f"{name}={os.path.abspath(json_file)}:{os.path.abspath(image_root)}"


class Study:
    def __init__(self, args, train_dataset, eval_dataset, eval_datasets, num_classes):
        self.out, self.records_dir = args.out, args.records
        self.configs, self.seeds = args.configs, args.seeds
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.eval_datasets = eval_datasets
        self.num_classes, self.iters, self.opts = num_classes, args.iters, list(args.opts)
        # Absolute paths: the train_net.py runs start in the repository root.
        self.dataset_args = [a for spec in args.dataset for a in ("--dataset", _absolute(spec))]
        self.jobs = args.jobs
        self.order = list(MATRIX)
        self.command_line = shlex.join(["python", "tools/longtail_study.py"] + sys.argv[1:])
        # The configs and the first stages they start from.
        names = self.configs + [STARTS_FROM[n] for n in self.configs if n in STARTS_FROM]
        self.config_files = {name: os.path.join(CONFIG_DIR, MATRIX[name]) for name in names}
        self.config_sha1 = {n: config_sha1(f) for n, f in self.config_files.items()}
        self.schedule = {
            name: (
                schedule_opts(load_config(self.config_files[name]), args.iters)
                if args.iters
                else []
            )
            for name in self.configs
        }
        commit, dirty = code_commit()
        if dirty and args.commit_records:
            raise StudyError(
                "the model code (" + ", ".join(MODEL_CODE_PATHS) + ") has uncommitted changes; "
                "commit them first: a committed record names the commit its run was trained with"
            )
        self.code_commit = commit
        self.train_identity = dataset_identity(train_dataset)
        self.commit_records = args.commit_records
        # Seed-major: a study stopped part-way has whole seeds of the matrix.
        self.runs = [Run(self, name, seed) for seed in self.seeds for name in self.configs]
        self.link_stages()

    def link_stages(self):
        """Gives each second-stage run its parent and the parent's key: the key of this
        command's run of the parent config, or, without one, of the parent's record."""
        runs = {(r.name, r.seed): r for r in self.runs}
        for run in self.runs:
            if run.name not in STARTS_FROM:
                continue
            name = STARTS_FROM[run.name]
            parent = runs.get((name, run.seed)) or Run(self, name, run.seed)
            run.parent = parent
            if (name, run.seed) in runs and parent.action() != "skip":
                run.starts_from = parent.key()  # it trains (or is evaluated) first
                continue
            # Trained already: its record must stand for the model in this --out's folder.
            rec, problem = run.recorded_parent()
            if rec is None:
                raise StudyError(
                    f"{run.label} starts from the trained {parent.label} of this --out, and "
                    f"{problem}; add {name} to --configs (it trains first), or use the --out "
                    "that holds it"
                )
            run.starts_from = rec["key"]

    def settings(self):
        """What makes a trained model besides config, seed, code and data."""
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

    def changed_since_start(self, run):
        """What of a run's key changed on disk since the command started ("" if nothing): runs
        are subprocesses that read the model code and config files when they start."""
        if code_commit()[0] != self.code_commit:
            return "the model code (" + ", ".join(MODEL_CODE_PATHS) + ")"
        if config_sha1(run.config_file) != self.config_sha1[run.name]:
            return f"its config ({os.path.relpath(run.config_file, ROOT)})"
        return ""

    def save_result(self, run):
        """Writes the run's record (and commits it with --commit-records)."""
        rec = run.build_result()
        write_record(run.result_file, rec)
        prune_checkpoints(run.dir)
        if self.commit_records:
            box = rec["metrics"].get(self.eval_dataset, {}).get("segm", {})
            error = commit_record(
                run.result_file,
                f"Study record: {run.name} seed {run.seed} (mask AP {_fmt(box.get('AP'))}, "
                f"APr {_fmt(box.get('APr'))} on {self.eval_dataset})",
            )
            if error:
                print(f"[study] WARNING: could not commit {run.result_file}: {error}")
        return rec


def prepare_weights(study, runs):
    """Builds (once) the synthetic-pretrained backbones the runs start from."""
    from fasa_seesaw.pretrain import PretrainError, ensure_pretrained, recipe_from_url

    opts = dict(zip(study.opts[::2], study.opts[1::2]))
    for name in OrderedDict.fromkeys(run.name for run in runs if run.parent is None):
        weights = opts.get("MODEL.WEIGHTS") or load_config(study.config_files[name]).MODEL.WEIGHTS
        try:
            recipe = recipe_from_url(weights)
        except PretrainError as e:
            raise StudyError(str(e)) from None
        if recipe is not None:
            t0 = time.perf_counter()
            path = ensure_pretrained(recipe)
            spent = time.perf_counter() - t0
            if spent > 1.0:
                print(f"[study] pretrained {recipe.name} in {_duration(spent)}: {path}")


def prune_checkpoints(run_dir):
    """Removes the intermediate checkpoints of a finished run (model_final.pth stays)."""
    for path in glob.glob(os.path.join(run_dir, "model_0*.pth")):
        os.remove(path)


def _duration(seconds):
    return str(datetime.timedelta(seconds=int(round(seconds))))


def run_study(args):
    train, evaluate, evaluations, num_classes = resolve_datasets(args)
    study = Study(args, train, evaluate, evaluations, num_classes)
    plan = [(run, run.action()) for run in study.runs]
    total = len(plan)
    print(
        f"[study] {len(study.configs)} configs x {len(study.seeds)} seeds = {total} runs; "
        f"train {train}, evaluate {', '.join(evaluations)} (table: {evaluate}), "
        f"{num_classes} classes; model code {_short(study.code_commit)}; records "
        f"{os.path.relpath(study.records_dir, ROOT)}; out {study.out}"
    )
    if args.dry_run:
        for run, action in plan:
            print(f"[{action}] {run.label}")
            if action != "skip":
                print("    " + shlex.join(run.command(action)))
        return 0

    study.check_settings()
    for run, action in plan:
        if action == "record":  # evaluated earlier: only the record is missing
            study.save_result(run)
    todo = [(run, action) for run, action in plan if action not in ("skip", "record")]
    if args.jobs > 1:
        # Second stages last: a worker waiting for a first stage would leave a core idle.
        todo.sort(key=lambda item: item[0].parent is not None)
    done = total - len(todo)
    if done:
        print(f"[study] skipping {done} finished runs (records with metrics for {evaluate})")
    if todo:
        from fasa_seesaw.data import prepare_datasets

        # Built-in data and pretrained weights are made once here, so no run's wall time
        # includes them.
        print("[study] preparing datasets (the first use of a built-in one generates it)")
        prepare_datasets([train] + evaluations)
        prepare_weights(study, [run for run, _ in todo])

    durations = [
        rec["timing"]["train_wall_s"] + rec["timing"]["eval_only_wall_s"]
        for rec in (run.result() for run, a in plan if a == "skip")
        if rec is not None
    ]
    start_time = time.perf_counter()
    stopped = []
    failed = []
    env = thread_env(args.jobs)
    if args.jobs > 1:
        print(f"[study] {args.jobs} runs at a time, {env['OMP_NUM_THREADS']} thread(s) each")
    state = {"done": done, "started": 0}
    lock = threading.Lock()
    # Each run's outcome in this command, so a second stage waits for its first (--jobs > 1)
    # and does not start after it failed or was not started.
    ended = {run.label: threading.Event() for run, _ in todo}
    outcome = {}

    def one(run, action):
        try:
            outcome[run.label] = one_run(run, action)
        finally:
            ended[run.label].set()

    def one_run(run, action):
        parent = run.parent.label if run.parent is not None else None
        if parent in ended:
            # Short waits, so the pool's shutdown on Ctrl-C is not held up.
            while not ended[parent].wait(timeout=1.0):
                pass
            if outcome.get(parent) != "ok":
                with lock:
                    print(f"[study] not starting {run.label}: {parent} did not finish")
                    (failed if outcome.get(parent) == "failed" else stopped).append(run.label)
                return outcome.get(parent)
        with lock:
            changed = study.changed_since_start(run)
            if changed:
                # The run would train with code or a config its record would not name.
                print(
                    f"[study] not starting {run.label}: {changed} changed since the start; "
                    "run the command again"
                )
                stopped.append(run.label)
                return "stopped"
            if args.max_minutes is not None and action != "evaluate":
                expected = np.mean(durations) if durations else 0.0
                if (time.perf_counter() - start_time + expected) / 60 > args.max_minutes:
                    stopped.append(run.label)
                    return "stopped"
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
                return "failed"
            elapsed = time.perf_counter() - start
            if action != "evaluate":
                durations.append(sum(run.wall_times()))
            state["done"] += 1
            study.save_result(run)
            m = load_metrics(run.metrics_file())
            summary = "  ".join(
                f"{short} AP {_fmt(m.get(task, {}).get('AP'))} "
                f"APr {_fmt(m.get(task, {}).get('APr'))}"
                for task, short in TASKS
            )
            print(f"[study] finished {run.label} in {_duration(elapsed)}: {summary}")
            write_outputs(study)
        return "ok"

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
    rows = write_outputs(study)
    print(
        f"[study] {len(rows)} records with metrics for {evaluate}; wrote results.json, table.md"
        + (", groups.png" if rows else "")
        + f" in {study.out} ({_duration(time.perf_counter() - start_time)} this command)"
    )
    if stopped:
        print(
            f"[study] {len(stopped)} runs not started ({', '.join(stopped)}): "
            + (f"--max-minutes {args.max_minutes:g}; " if args.max_minutes else "")
            + "run the same command again to go on"
        )
    if failed:
        print(f"[study] {len(failed)} runs failed: {', '.join(failed)}; run again to retry them")
        return 1
    return 0


def _short(commit):
    head, plus, tail = commit.partition("+")
    return head[:12] + plus + tail


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
