# Copyright (c) fasa_seesaw contributors.
"""
The long-tail study's run records: one json per (config, seed), written when the run ends and
meant to be committed (docs/study/records/<config>/seed<k>.json), so a study that does not fit
one sitting completes over several, on any machine with the repository.

A record holds the run's key and what it produced:

    key       config name, sha1 of its config files (the _BASE_ chain), seed, the commit of the
              model code (the last commit touching MODEL_CODE_PATHS, test helpers aside), the
              training dataset's identity (a built-in spec's hash, or the sha1 of an LVIS json)
              and the study's settings (--iters, --opts)
    metrics   per evaluation dataset: box and mask LVIS AP/APr/APc/APf (+ TIDE when evaluated),
              rare classes with AP > 0
    timing    training + evaluation wall seconds, threads, start and end
    fasa      per adaptation pass: groups formed, largest group, classes moved up / down

tools/longtail_study.py skips a run whose record has the current key and metrics for the
evaluation dataset; tools/study_report.py rebuilds the table and plot from the records alone.
"""

import glob
import hashlib
import json
import os
import subprocess
from collections import OrderedDict
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What makes a trained model (besides its config and data): a change here makes records stale.
MODEL_CODE_PATHS = ("projects/fasa_seesaw", "train_net.py")
# ... except the test helpers, which no training run imports.
_PATHSPEC = MODEL_CODE_PATHS + (":(exclude)projects/fasa_seesaw/testing.py",)
RECORD_VERSION = 1


def _git(*args):
    try:
        out = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_commit():
    """(key, dirty): the last commit that touched the model code, with "+dirty" appended when
    the working tree changes that code now (a key no committed record has), and whether it
    does. ("unknown", False) outside a git checkout."""
    commit = _git("log", "-1", "--format=%H", "--", *_PATHSPEC)
    if not commit:
        return "unknown", False
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", *_PATHSPEC))
    return commit + ("+dirty" if dirty else ""), dirty


def head_commit():
    return _git("rev-parse", "HEAD") or "unknown"


def config_chain(path):
    """The config file and its _BASE_ files, the file itself first."""
    chain = []
    while path:
        chain.append(os.path.abspath(path))
        with open(path, encoding="utf-8") as f:
            base = (yaml.safe_load(f) or {}).get("_BASE_")
        path = os.path.join(os.path.dirname(path), base) if base else None
    return chain


def config_sha1(path):
    """sha1 over the bytes of the config file and its _BASE_ chain."""
    h = hashlib.sha1()
    for p in config_chain(path):
        with open(p, "rb") as f:
            h.update(os.path.basename(p).encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()


def dataset_identity(name):
    """A built-in synthetic split: its spec's hash; a registered LVIS json: the file's sha1."""
    from detectron2.data import MetadataCatalog

    from fasa_seesaw.data.synth import SPECS

    for spec in SPECS.values():
        if name.startswith(f"longtail_synth_{spec.name}_"):
            return f"synth:{spec.name}:{spec.spec_hash()[:16]}"
    json_file = MetadataCatalog.get(name).get("json_file", None)
    if json_file and os.path.isfile(json_file):
        with open(json_file, "rb") as f:
            return "json:" + hashlib.sha1(f.read()).hexdigest()[:16]
    return f"name:{name}"


def record_path(records_dir, config, seed):
    return os.path.join(records_dir, config, f"seed{seed}.json")


def read_record(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=OrderedDict)
    except (OSError, ValueError):
        return None


def write_record(path, record):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def commit_record(path, message):
    """Commits this one file (nothing else staged goes with it). Returns an error or None."""
    rel = os.path.relpath(path, ROOT)
    if _git("add", "--", rel) is None:
        return f"git add {rel} failed"
    out = subprocess.run(
        ["git", "-C", ROOT, "commit", "-q", "-m", message, "--", rel],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return (out.stderr or out.stdout).strip().splitlines()[-1:] or ["git commit failed"]
    return None


def all_records(records_dir):
    """Every record under records_dir, as (path, record)."""
    out = []
    for path in sorted(glob.glob(os.path.join(records_dir, "*", "seed*.json"))):
        rec = read_record(path)
        if rec is not None and rec.get("version") == RECORD_VERSION:
            out.append((path, rec))
    return out


def fasa_passes(run_dir):
    """The adaptation passes of a run (fasa_adaptation.jsonl), the last line per (pass, stage)."""
    path = os.path.join(run_dir, "fasa_adaptation.jsonl")
    if not os.path.isfile(path):
        return None
    passes = OrderedDict()
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rec = json.loads(line)
                passes[(rec["pass"], rec["stage"])] = rec
    return [passes[k] for k in sorted(passes)]
