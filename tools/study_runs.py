# Copyright (c) fasa_seesaw contributors.
"""
One run of the long-tail study (tools/longtail_study.py): its folder (what to do next, the
train_net.py command, the record of attempts and wall times, the metrics file) and the
train_net.py subprocess that trains or evaluates it.
"""

import datetime
import glob
import hashlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections import OrderedDict

from study_records import RECORD_VERSION, fasa_passes, head_commit, read_record, record_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(ROOT, "train_net.py")


class Run:
    """One (config, seed) cell of the matrix: its folder and its committed record."""

    def __init__(self, study, name, seed):
        self.study, self.name, self.seed = study, name, seed
        self.config_file = study.config_files[name]
        self.dir = os.path.join(study.out, "runs", name, f"seed{seed}")
        self.record_file = os.path.join(self.dir, "study_run.json")  # attempts (local)
        self.result_file = record_path(study.records_dir, name, seed)  # the record (committed)
        # A second stage (longtail_study.STARTS_FROM): the run whose model it starts from, and
        # that run's key, set by the study when it plans.
        self.parent, self.starts_from = None, None

    @property
    def starts_from_digest(self):
        """A short digest of the parent's key (None for a run that starts from a backbone)."""
        if self.starts_from is None:
            return None
        text = json.dumps(self.starts_from, sort_keys=True)
        return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]

    def recorded_parent(self):
        """(record, problem): the parent's record if it stands for the model in the parent's
        folder (same --out, model_final.pth there, the study's data and settings), else a
        sentence saying what is missing."""
        p = self.parent
        model = os.path.join(p.dir, "model_final.pth")
        rec = read_record(p.result_file)
        if not os.path.isfile(model) or rec is None or rec.get("version") != RECORD_VERSION:
            return None, f"{model} and its record {p.result_file} are needed"
        command = rec.get("command", [])
        out_dirs = [b for a, b in zip(command, command[1:]) if a == "OUTPUT_DIR"]
        if out_dirs[-1:] != [p.dir]:
            other = out_dirs[-1] if out_dirs else "none named"
            return None, f"its record {p.result_file} is of another folder ({other})"
        key = rec.get("key")
        if not isinstance(key, dict):
            return None, f"its record {p.result_file} has no key"
        study_key = json.loads(json.dumps(p.key()))
        for field in ("train_dataset", "settings"):
            if key.get(field) != study_key[field]:
                return None, f"it was trained with other {field.replace('_', ' ')}"
        return rec, ""

    @property
    def label(self):
        return f"{self.name} seed {self.seed}"

    def key(self):
        """What must match for a record to stand for this run (see study_records)."""
        return OrderedDict(
            config=self.name,
            config_sha1=self.study.config_sha1[self.name],
            seed=self.seed,
            code_commit=self.study.code_commit,
            train_dataset=self.study.train_identity,
            settings=self.study.settings(),
            **({} if self.starts_from is None else {"starts_from": self.starts_from}),
        )

    def result(self):
        """This run's record if it has the current key, else None."""
        rec = read_record(self.result_file)
        if rec is None or rec.get("version") != RECORD_VERSION:
            return None
        return rec if rec.get("key") == json.loads(json.dumps(self.key())) else None

    def metrics_file(self, dataset=None):
        """The newest lvis_metrics.json in the run folder for `dataset` (default: the study's
        evaluation dataset), or None."""
        ds = dataset or self.study.eval_dataset
        found = glob.glob(os.path.join(self.dir, "inference", ds, "lvis_metrics.json"))
        found += glob.glob(
            os.path.join(self.dir, "eval", "*", "*", "inference", ds, "lvis_metrics.json")
        )
        return max(found, key=os.path.getmtime) if found else None

    def trained_key(self):
        """(model-code commit, config sha1, parent digest) of the folder's training attempts;
        None without any attempt, "mixed" if they differ. Attempts written before the first two
        were recorded give (None, None, None), which never matches: such a folder is stale."""
        keys = {
            (a.get("code_commit"), a.get("config_sha1"), a.get("starts_from"))
            for a in self.attempts()["attempts"]
            if a["action"] in ("train", "resume", "restart")
        }
        return keys.pop() if len(keys) == 1 else (None if not keys else "mixed")

    def action(self):
        """skip | record | evaluate | resume | restart | train."""
        rec = self.result()
        if rec is not None and self.study.eval_dataset in rec["metrics"]:
            return "skip"
        local = os.path.isdir(self.dir) and os.listdir(self.dir)
        trained = self.trained_key()
        current = (
            self.study.code_commit,
            self.study.config_sha1[self.name],
            self.starts_from_digest,
        )
        if local and trained is not None and trained != current:
            return "restart"  # trained with other model code or config: stale
        if all(self.metrics_file(ds) for ds in self.study.eval_datasets):
            return "record"  # evaluated, but no record of the current key yet
        if os.path.isfile(os.path.join(self.dir, "model_final.pth")):
            return "evaluate"  # trained; an evaluation dataset has no metrics yet
        if os.path.isfile(os.path.join(self.dir, "last_checkpoint")):
            return "resume"
        if local:
            return "restart"
        return "train"

    def command(self, action):
        s = self.study
        tests = "(" + "".join(f"'{d}'," for d in s.eval_datasets) + ")"
        data = [
            "DATASETS.TRAIN", f"('{s.train_dataset}',)",
            "DATASETS.TEST", tests,
            "MODEL.ROI_HEADS.NUM_CLASSES", str(s.num_classes),
        ]  # fmt: skip
        cmd = [sys.executable, TRAIN_NET, "--config-file", self.config_file] + s.dataset_args
        out, extra = self.dir, []
        if action == "evaluate":
            cmd.append("--eval-only")
            # train_net.py adds eval_<time> to OUTPUT_DIR: nothing earlier is overwritten.
            out = os.path.join(self.dir, "eval", s.eval_dataset)
            extra = ["MODEL.WEIGHTS", os.path.join(self.dir, "model_final.pth")]
        elif action == "resume":
            cmd.append("--resume")
        if action != "evaluate" and self.parent is not None:
            extra = ["MODEL.WEIGHTS", os.path.join(self.parent.dir, "model_final.pth")]
        opts = ["SEED", str(self.seed), "OUTPUT_DIR", out] + data + s.schedule[self.name]
        return cmd + opts + s.opts + extra

    def attempts(self):
        try:
            with open(self.record_file, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {"config": self.name, "seed": self.seed, "attempts": []}

    def add_attempt(self, action, command, returncode, **timing):
        """Appends one train_net.py attempt, with what it was trained or evaluated with."""
        attempt = OrderedDict(
            action=action,
            eval_datasets=list(self.study.eval_datasets),
            code_commit=self.study.code_commit,
            config_sha1=self.study.config_sha1[self.name],
            starts_from=self.starts_from_digest,
        )
        attempt.update(timing, returncode=returncode, command=command)
        rec = self.attempts()
        rec["attempts"].append(attempt)
        os.makedirs(self.dir, exist_ok=True)
        # Written to a temporary file and renamed: another thread may read it (--jobs).
        tmp = self.record_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(rec, f, indent=2)
        os.replace(tmp, self.record_file)

    def build_result(self):
        """The record of the finished run folder (metrics of every evaluated dataset), merged
        with an earlier record of the same key (e.g. one split evaluated before)."""
        from study_report import TASKS, load_metrics, rare_classes_with_ap

        old = self.result()
        metrics = OrderedDict(old["metrics"]) if old else OrderedDict()
        for ds in self.study.eval_datasets:
            path = self.metrics_file(ds)
            if path is None:
                continue
            m = load_metrics(path)
            entry = OrderedDict((task, m.get(task, {})) for task, _ in TASKS)
            entry["rare_classes_with_ap"] = rare_classes_with_ap(os.path.dirname(path))
            metrics[ds] = entry
        train_s, eval_s = self.wall_times()
        passes = fasa_passes(self.dir)
        attempts = self.attempts()["attempts"]
        threads = {a.get("threads") for a in attempts if a.get("returncode") == 0}
        return OrderedDict(
            version=RECORD_VERSION,
            key=self.key(),
            config=self.name,
            config_file=os.path.relpath(self.config_file, ROOT),
            seed=self.seed,
            code_commit=self.study.code_commit,
            head_commit=head_commit(),
            train_dataset=self.study.train_dataset,
            metrics=metrics,
            timing=OrderedDict(
                train_wall_s=round(train_s, 2),
                eval_only_wall_s=round(eval_s, 2),
                threads=sorted(t for t in threads if t) or None,
                finished=datetime.datetime.now().isoformat(timespec="seconds"),
            ),
            fasa=OrderedDict(passes=passes) if passes else None,
            command=self.command("train")[1:],
        )

    def wall_times(self):
        """(training wall s, all attempts; eval-only wall s, successful ones on this dataset)."""
        attempts = self.attempts()["attempts"]
        train = sum(a["wall_s"] for a in attempts if a["action"] in ("train", "resume", "restart"))
        evaluate = sum(
            a["wall_s"]
            for a in attempts
            if a["action"] == "evaluate"
            and self.study.eval_dataset in a.get("eval_datasets", [a.get("eval_dataset")])
            and a["returncode"] == 0
        )
        return train, evaluate

    def move_aside(self):
        n = 1
        while os.path.exists(f"{self.dir}.failed-{n}"):
            n += 1
        os.rename(self.dir, f"{self.dir}.failed-{n}")
        return f"{self.dir}.failed-{n}"


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
                action,
                cmd,
                rc,
                started=started,
                wall_s=round(time.perf_counter() - start, 2),
                threads=(env or os.environ).get("OMP_NUM_THREADS"),
            )
    if rc != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read().splitlines()[-15:]
        print(f"[study] FAILED {run.label} (exit {rc}); last lines of {log_path}:")
        print("\n".join("    " + t for t in tail))
    return rc
