#!/usr/bin/env python
# Copyright (c) fasa_seesaw contributors.
"""
Checks that FASA did what it should in trained runs: the questions to ask before tuning when FASA
does not help (the long-tail study's "find out why").

For each run folder (a train_net.py OUTPUT_DIR with model_final.pth and metrics.json, trained with
MODEL.FASA.ENABLED) it answers:

  bank     Is the feature bank reading the classifier's input? The trained classifier is applied
           to each class's bank mean: if the bank holds the features the classifier sees, a
           class's own mean is classified as that class far above chance (1 / num classes).
  virtual  Do virtual features reach the loss? The number drawn per step and loss_fasa after the
           warm-up, from metrics.json (detectron2 writes one value every 20 iterations).
  adapt    Does adaptation move the probabilities, and were the counts right? The initial p is
           recomputed from the training split's instance counts (the split train_net.py carves);
           every class's final p / initial p must then be 1.1^a * 0.9^b with a + b <= passes - 1
           (the adaptation rule). Reported: passes, groups, largest group, classes moved, and
           p summed per r/c/f group before and after.

Examples:
    python tools/fasa_diagnostics.py output/study/runs/fasa*/seed*
    python tools/fasa_diagnostics.py --study output/study --md output/study/fasa_diagnostics.md
"""

import argparse
import glob
import json
import math
import numpy as np
import os
import shlex
import sys
from collections import OrderedDict
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plot_figures as pf  # noqa: E402  (its checkpoint readers; tools/ is not a package)
from fasa_seesaw import ConfigError  # noqa: E402

GROUPS = ("r", "c", "f")


class ToolError(Exception):
    """Bad input; printed as one line."""


def train_command(run_dir):
    """The train_net.py config file and options of the run's training (study_run.json)."""
    path = os.path.join(run_dir, "study_run.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            attempts = json.load(f)["attempts"]
        for a in attempts:
            if a["action"] in ("train", "restart", "resume"):
                cmd = list(a["command"])
                i = cmd.index("--config-file")
                opts = [c for c in cmd[i + 2 :] if c not in ("--resume", "--eval-only")]
                return cmd[i + 1], opts
    return None, None


def upgrade_saved_config(data):
    """A run's saved config.yaml (nested dict) under today's key names."""
    from fasa_seesaw.config import upgrade_config_dict

    return upgrade_config_dict(data)


def training_cfg(run_dir):
    """The config the run trained with, FASA's held-out carve included (registered here)."""
    from detectron2.config import get_cfg

    from fasa_seesaw import add_fasa_seesaw_config
    from fasa_seesaw.config import merge_config
    from fasa_seesaw.engine.fasa_hook import configure_fasa_heldout

    config_file, opts = train_command(run_dir)
    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    if config_file is not None:
        merge_config(cfg, config_file, opts)  # a renamed key: a ConfigError naming the new one
    else:  # a train_net.py run outside the study: its config.yaml names the carved split
        saved = os.path.join(run_dir, "config.yaml")
        if not os.path.isfile(saved):
            raise ToolError(f"{run_dir} has neither study_run.json nor config.yaml")
        # Written by train_net.py, possibly before keys were renamed.
        data = upgrade_saved_config(cfg.load_yaml_with_base(saved, allow_unsafe=True))
        cfg.merge_from_other_cfg(type(cfg)(data))
        bases = tuple(pf.metadata_dataset(n) for n in cfg.DATASETS.TRAIN)
        if bases != tuple(cfg.DATASETS.TRAIN):  # train_net.py carved the split: carve it again
            cfg.DATASETS.TRAIN = bases
            cfg.MODEL.FASA.ADAPT.HELDOUT_DATASET = ""
    if not cfg.MODEL.FASA.ENABLED:
        raise ToolError(f"{run_dir} was trained without FASA (MODEL.FASA.ENABLED False)")
    configure_fasa_heldout(cfg)
    return cfg


def adaptation_exponents(ratio, passes, up=1.1, down=0.9, tol=1e-4):
    """
    For each class, (a, b) with ratio == up^a * down^b and a + b <= passes - 1, or None when no
    such pair exists (counts or the rule do not match). The first pass only sets the baseline.
    The rule clamps p to [0, 1]; a class that reached 1 is not covered here (see diagnose).
    """
    out = []
    steps = max(passes - 1, 0)
    for r in np.asarray(ratio, dtype=np.float64):
        found = None
        if r > 0:
            lr = math.log(r)
            for a in range(steps + 1):
                for b in range(steps + 1 - a):
                    if abs(lr - a * math.log(up) - b * math.log(down)) < tol:
                        found = (a, b)
                        break
                if found:
                    break
        out.append(found)
    return out


def bank_self_accuracy(cfg, weights, mean, seen):
    """Fraction of seen classes whose bank mean the trained classifier assigns to that class."""
    from detectron2.modeling import build_model

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    pf.load_weights(model, weights)
    model.eval()
    predictor = model.roi_heads.box_predictor
    if isinstance(predictor, torch.nn.ModuleList):  # a cascade: the last stage's bank
        predictor = predictor[-1]
    C = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    with torch.no_grad():
        scores = predictor(torch.as_tensor(mean, dtype=torch.float32))
    scores = scores[0] if isinstance(scores, (tuple, list)) else scores
    pred = scores[:, :C].argmax(dim=1).numpy()
    idx = np.flatnonzero(seen)
    return float((pred[idx] == idx).mean()) if idx.size else float("nan")


def warmup_iters(cfg):
    """MODEL.FASA.WARMUP_ITERS, with -1 resolved as the predictor does (one epoch)."""
    from fasa_seesaw.data.counts import epoch_iterations

    w = cfg.MODEL.FASA.WARMUP_ITERS
    if w >= 0:
        return w
    return epoch_iterations(
        cfg.DATASETS.TRAIN, cfg.SOLVER.IMS_PER_BATCH, cfg.MODEL.ROI_HEADS.NUM_CLASSES
    )


def virtual_stats(run_dir, warmup):
    """
    Virtual features per step and how often loss_fasa > 0 after the warm-up, from metrics.json:
    detectron2 writes one row every 20 iterations, the count as the latest value and the loss
    as the median of the last 20 iterations.
    """
    rows = []
    path = os.path.join(run_dir, "metrics.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    after = [r for r in rows if r.get("iteration", -1) >= warmup]
    nv = [r["fasa/num_virtual"] for r in after if "fasa/num_virtual" in r]
    lf = [r["loss_fasa"] for r in after if "loss_fasa" in r]
    return {
        "virtual_per_step": float(np.mean(nv)) if nv else None,
        "virtual_samples": len(nv),
        "loss_fasa_mean": float(np.mean(lf)) if lf else None,
        "loss_fasa_nonzero": float(np.mean(np.asarray(lf) > 0)) if lf else None,
    }


def diagnose(run_dir):
    from fasa_seesaw.data.counts import instance_counts_of
    from fasa_seesaw.modeling.fasa_sampling import initial_probabilities

    weights = os.path.join(run_dir, "model_final.pth")
    if not os.path.isfile(weights):
        raise ToolError(f"{run_dir} has no model_final.pth (not trained to the end)")
    cfg = training_cfg(run_dir)
    C = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    bank = pf.load_fasa_bank(weights)
    probs = bank["probs"]
    if probs is None:
        raise ToolError(f"{weights} holds no FASA draw probabilities (fasa.probs)")
    counts = instance_counts_of(cfg.DATASETS.TRAIN, C)
    p0 = initial_probabilities(counts, cfg.MODEL.FASA.INIT_PROBS)
    freq = np.asarray(pf.category_info(cfg)["frequency"])
    a = cfg.MODEL.FASA.ADAPT
    exps = adaptation_exponents(probs / p0, bank["passes"], a.UP_FACTOR, a.DOWN_FACTOR)
    clamped = probs >= 1.0 - 1e-6  # the rule's clamp at 1 ends the product form
    groups = bank["groups"]
    sizes = np.bincount(groups) if groups is not None else np.zeros(0, dtype=int)
    out = OrderedDict(
        run=run_dir,
        classes_seen=int(bank["seen"].sum()),
        num_classes=C,
        bank_nonneg=float((bank["mean"][bank["seen"]] >= 0).mean()),
        bank_self_acc=bank_self_accuracy(cfg, weights, bank["mean"], bank["seen"]),
        **virtual_stats(run_dir, warmup_iters(cfg)),
        passes=bank["passes"],
        num_groups=int((sizes > 0).sum()),
        largest_group=int(sizes.max()) if sizes.size else 0,
        counts_match_rule=int(sum(e is not None or c for e, c in zip(exps, clamped))),
        clamped_at_one=int(clamped.sum()),
        moved_up=int(sum(e is not None and e[0] > e[1] for e in exps)),
        moved_down=int(sum(e is not None and e[1] > e[0] for e in exps)),
        p_sum_init={g: float(p0[freq == g].sum()) for g in GROUPS},
        p_sum_final={g: float(probs[freq == g].sum()) for g in GROUPS},
        samples_per_class=cfg.MODEL.FASA.SAMPLES_PER_CLASS,
    )
    return out


def _f(v, fmt="{:.2f}"):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def format_md(results):
    head = (
        "| run | bank: self-acc (chance) | bank >= 0 | virtual/step | loss_fasa > 0 | passes | "
        "groups (largest) | p rule holds | up / down | p sum r/c/f: init -> final |"
    )
    lines = [head, head_sep(head)]
    for d in results:
        rel = os.path.relpath(d["run"])
        ps = "/".join(_f(d["p_sum_init"][g]) for g in GROUPS)
        pe = "/".join(_f(d["p_sum_final"][g]) for g in GROUPS)
        lines.append(
            f"| `{rel}` | {_f(d['bank_self_acc'])} ({1.0 / d['num_classes']:.2f}) "
            f"| {_f(d['bank_nonneg'])} | {_f(d['virtual_per_step'])} "
            f"| {_f(d['loss_fasa_nonzero'])} | {d['passes']} "
            f"| {d['num_groups']} ({d['largest_group']}) "
            f"| {d['counts_match_rule']}/{d['num_classes']} | {d['moved_up']} / {d['moved_down']} "
            f"| {ps} -> {pe} |"
        )
    return "\n".join(lines) + "\n"


def head_sep(head):
    return "|" + "|".join(" --- " for _ in range(head.count("|") - 1)) + "|"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("runs", nargs="*", help="run folders (train_net.py OUTPUT_DIRs)")
    ap.add_argument("--study", help="a longtail_study.py --out folder: all its FASA runs")
    ap.add_argument("--md", help="also write the table to this markdown file")
    ap.add_argument("--json", help="also write the numbers to this json file")
    args = ap.parse_args(argv)
    try:
        runs = list(args.runs)
        if args.study:
            if not os.path.isdir(os.path.join(args.study, "runs")):
                raise ToolError(f"{args.study} is not a study folder (no runs/ in it)")
            runs += sorted(glob.glob(os.path.join(args.study, "runs", "fasa*", "seed*[0-9]")))
        if not runs:
            raise ToolError("no run folders given (pass run folders or --study)")
        results = [diagnose(r) for r in runs]
        for path in (args.md, args.json):
            if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                raise ToolError(f"the folder of {path} does not exist; create it first")
    except (ToolError, pf.ToolError, ConfigError) as e:
        sys.exit(f"error: {e}")
    except (KeyError, ValueError, OSError) as e:  # a dataset, record or file that is not there
        sys.exit(
            f"error: {type(e).__name__}: {e} (is the run folder complete and its dataset "
            "registered?)"
        )
    command = shlex.join(["python", "tools/fasa_diagnostics.py"] + sys.argv[1:])
    md = format_md(results) + f"\nCommand: `{command}`\n"
    print(md)
    for path, text in ((args.md, md), (args.json, json.dumps(results, indent=2))):
        if path:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
