# Copyright (c) fasa_seesaw contributors.
"""
tools/longtail_study.py end to end, tiny: 2 configs x 1 seed for a few iterations on the built-in
smoke dataset; writes results.json / table.md / groups.png, skips finished runs when run again,
only evaluates a trained run that has no metrics for the evaluation dataset, and refuses bad
input in one line.
"""

import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(ROOT, "tools", "longtail_study.py")
# The smoke spec (12 classes, 64 px images) and a schedule of seconds, as test_end_to_end.py.
SMOKE_ARGS = ["--spec", "smoke", "--seeds", "0", "--iters", "6", "--opts"] + [
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
    # The test suite's pretrained backbone (seconds to build), not the study's.
    "MODEL.WEIGHTS", "fasa_seesaw://pretrained/R-18-synth-tiny.pth",
]  # fmt: skip


def run_study(args, env):
    return subprocess.run(
        [sys.executable, STUDY] + args,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def table_rows(path):
    """Config names of the main table (not of the differences table under it)."""
    with open(path) as f:
        text = f.read().split("\nDifference to ")[0]
    lines = [line for line in text.splitlines() if line.startswith("| `")]
    return [line.split("|")[1].strip().strip("`") for line in lines]


@pytest.mark.slow  # trains in subprocesses
class TestLongTailStudy(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.tmp = cls._tmp.name
        cls.env = dict(os.environ)  # the session's data root (tests/conftest.py)
        cls.out = os.path.join(cls.tmp, "study")
        cls.args = ["--out", cls.out, "--configs", "ce", "seesaw"] + SMOKE_ARGS
        # Snapshots after each command: later tests run the study again on the same folder.
        cls.first = run_study(cls.args, cls.env)
        cls.first_files = cls.snapshot()
        # The records as the first command left them (later tests change self.out).
        cls.first_records = os.path.join(cls.tmp, "first_records")
        if cls.first.returncode == 0:
            shutil.copytree(os.path.join(cls.out, "records"), cls.first_records)
        # A pristine copy for test_two_jobs_evaluate_side_by_side (other tests change self.out).
        cls.jobs_out = os.path.join(cls.tmp, "jobs")
        if cls.first.returncode == 0:
            shutil.copytree(cls.out, cls.jobs_out)
        cls.second = run_study(cls.args, cls.env) if cls.first.returncode == 0 else None
        cls.second_files = cls.snapshot()

    @classmethod
    def snapshot(cls):
        files = {}
        try:
            with open(os.path.join(cls.out, "results.json")) as f:
                files["results"] = json.load(f)
            files["table"] = table_rows(os.path.join(cls.out, "table.md"))
            with open(os.path.join(cls.out, "table.md")) as f:
                files["table_text"] = f.read()
            with open(os.path.join(cls.out, "groups.png"), "rb") as f:
                files["png"] = f.read(8)
            with open(os.path.join(cls.out, "runs", "ce", "seed0", "study_run.json")) as f:
                files["attempts"] = json.load(f)["attempts"]
            with open(os.path.join(cls.out, "runs", "ce", "seed0", "config.yaml")) as f:
                files["config"] = f.read()
        except OSError:
            pass
        return files

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_runs_and_writes_results(self):
        r = self.first
        self.assertEqual(r.returncode, 0, r.stdout[-3000:] + r.stderr[-3000:])
        self.assertIn("[study] 0/2 done", r.stdout)
        self.assertIn("[study] 1/2 done", r.stdout)
        self.assertIn("ETA 0:", r.stdout)  # known after the first run
        files = self.first_files
        results = files["results"]
        runs = results["runs"]
        self.assertEqual([(x["config"], x["seed"]) for x in runs], [("ce", 0), ("seesaw", 0)])
        for x in runs:
            self.assertGreater(x["wall_s"], 0)
            for task in ("bbox", "segm"):
                for key in ("AP", "APr", "APc", "APf"):
                    self.assertIn(key, x[task])
                self.assertTrue(0.0 <= x[task]["AP"] <= 100.0)
        # Rare classes with AP > 0, counted from the per-category CSVs of every run.
        from fasa_seesaw.data.synth import SMOKE, spec_categories

        num_rare = sum(c["frequency"] == "r" for c in spec_categories(SMOKE))
        for x in runs:
            for task in ("bbox", "segm"):
                found, total = x["rare_classes_with_ap"][task]
                self.assertEqual(total, num_rare)  # every rare class has val GT
                self.assertTrue(0 <= found <= total)
        self.assertEqual(results["study"]["eval_dataset"], "longtail_synth_smoke_val")
        self.assertEqual(results["study"]["num_classes"], 12)  # read from the dataset
        self.assertEqual(set(results["summary"]), {"ce", "seesaw"})
        self.assertEqual(files["table"], ["ce", "seesaw"])
        # One seed: the differences table is there, without spreads to compare against.
        self.assertIn("Difference to `ce`", files["table_text"])
        self.assertEqual(results["differences"]["seesaw"]["segm"]["APr"], None)
        self.assertEqual(files["png"], b"\x89PNG\r\n\x1a\n")
        # The short schedule reached train_net.py.
        self.assertIn("MAX_ITER: 6", files["config"])
        self.assertIn("NUM_CLASSES: 12", files["config"])

    def test_second_run_skips_finished_runs(self):
        self.assertEqual(self.first.returncode, 0)
        r = self.second
        self.assertEqual(r.returncode, 0, r.stdout[-3000:] + r.stderr[-3000:])
        self.assertIn("skipping 2 finished runs", r.stdout)
        self.assertNotIn("next:", r.stdout)
        files = self.second_files
        self.assertEqual(files["table"], ["ce", "seesaw"])
        self.assertEqual(len(files["attempts"]), 1)  # nothing ran again
        self.assertEqual(files["results"]["runs"], self.first_files["results"]["runs"])

    def test_unevaluated_run_is_only_evaluated(self):
        # A trained run without a record or metrics (as when another split is asked for) is
        # evaluated with --eval-only, not trained again, and its record is written.
        self.assertEqual(self.first.returncode, 0)
        run = os.path.join(self.out, "runs", "ce", "seed0")
        os.rename(os.path.join(run, "inference"), os.path.join(run, "inference.moved"))
        os.remove(os.path.join(self.out, "records", "ce", "seed0.json"))
        args = self.args[:]
        args[args.index("--configs") + 1 : args.index("--configs") + 3] = ["ce"]
        r = run_study(args, self.env)
        self.assertEqual(r.returncode, 0, r.stdout[-3000:] + r.stderr[-3000:])
        self.assertIn("next: ce seed 0 (evaluate)", r.stdout)
        with open(os.path.join(run, "study_run.json")) as f:
            actions = [a["action"] for a in json.load(f)["attempts"]]
        self.assertEqual(actions, ["train", "evaluate"])
        with open(os.path.join(self.out, "records", "ce", "seed0.json")) as f:
            record = json.load(f)
        self.assertGreater(record["timing"]["eval_only_wall_s"], 0)
        self.assertIn("longtail_synth_smoke_val", record["metrics"])

    def test_records_let_a_fresh_folder_skip_finished_runs(self):
        # A new machine: no run folders, only the (committed) records. Nothing is trained again,
        # and the table is rebuilt from the records.
        self.assertEqual(self.first.returncode, 0)
        records = os.path.join(self.tmp, "records_copy")
        shutil.copytree(self.first_records, records)
        out = os.path.join(self.tmp, "fresh")
        args = self.args[:]
        args[args.index("--out") + 1] = out
        r = run_study(["--records", records] + args, self.env)
        self.assertEqual(r.returncode, 0, r.stdout[-3000:] + r.stderr[-3000:])
        self.assertIn("skipping 2 finished runs", r.stdout)
        self.assertNotIn("next:", r.stdout)
        self.assertFalse(os.path.exists(os.path.join(out, "runs")))
        self.assertEqual(table_rows(os.path.join(out, "table.md")), ["ce", "seesaw"])
        with open(os.path.join(out, "results.json")) as f:
            rows = json.load(f)["runs"]
        first_rows = self.first_files["results"]["runs"]
        for a, b in zip(rows, first_rows):
            self.assertEqual(
                (a["config"], a["seed"], a["segm"]), (b["config"], b["seed"], b["segm"])
            )

        # A record of other model code is stale: the run is planned again.
        path = os.path.join(records, "seesaw", "seed0.json")
        with open(path) as f:
            rec = json.load(f)
        rec["key"]["code_commit"] = "0" * 40
        with open(path, "w") as f:
            json.dump(rec, f)
        r = run_study(["--records", records, "--dry-run"] + args, self.env)
        self.assertEqual(r.returncode, 0, r.stderr[-3000:])
        self.assertIn("[train] seesaw seed 0", r.stdout)
        self.assertNotIn("[train] ce seed 0", r.stdout)

        # --max-minutes: a run that would end past the budget (estimated from the finished
        # ones) is not started; the command says so and succeeds.
        r = run_study(["--records", records, "--max-minutes", "0.0001"] + args, self.env)
        self.assertEqual(r.returncode, 0, r.stdout[-3000:] + r.stderr[-3000:])
        self.assertIn(
            "1 runs not started (seesaw seed 0): --max-minutes 0.0001; run the same command",
            r.stdout,
        )
        self.assertFalse(os.path.exists(os.path.join(out, "runs", "seesaw")))

    def test_record_holds_the_key_and_the_metrics(self):
        self.assertEqual(self.first.returncode, 0)
        with open(os.path.join(self.first_records, "ce", "seed0.json")) as f:
            rec = json.load(f)
        key = rec["key"]
        self.assertEqual((key["config"], key["seed"]), ("ce", 0))
        # The commit is the last one that touched the model code (asked of git here).
        last = subprocess.run(
            ["git", "-C", ROOT, "log", "-1", "--format=%H", "--", "projects/fasa_seesaw",
             "train_net.py", ":(exclude)projects/fasa_seesaw/testing.py"],
            capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        self.assertTrue(key["code_commit"].startswith(last), (key["code_commit"], last))
        from fasa_seesaw.data.synth import SMOKE

        self.assertEqual(key["train_dataset"], f"synth:smoke:{SMOKE.spec_hash()[:16]}")
        self.assertEqual(key["settings"]["iters"], 6)
        self.assertEqual(len(key["config_sha1"]), 40)
        m = rec["metrics"]["longtail_synth_smoke_val"]
        self.assertEqual(set(m), {"bbox", "segm", "rare_classes_with_ap"})
        self.assertGreater(rec["timing"]["train_wall_s"], 0)
        self.assertIsNone(rec["fasa"])  # no FASA in ce

    def test_report_rebuilds_the_table_from_records(self):
        self.assertEqual(self.first.returncode, 0)
        out = os.path.join(self.tmp, "report")
        r = subprocess.run(
            [sys.executable, os.path.join(ROOT, "tools", "study_report.py"), "--records",
             self.first_records, "--out", out, "--spec", "smoke", "--split", "val"],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        self.assertEqual(r.returncode, 0, r.stdout[-3000:] + r.stderr[-3000:])
        self.assertEqual(table_rows(os.path.join(out, "table.md")), ["ce", "seesaw"])
        with open(os.path.join(out, "results.json")) as f:
            summary = json.load(f)["summary"]
        first = self.first_files["results"]["summary"]
        self.assertEqual(summary["seesaw"]["segm"], first["seesaw"]["segm"])

    def test_two_jobs_evaluate_side_by_side(self):
        # --jobs 2 on a copy of the trained study: both runs lack metrics and records, so both
        # are evaluated, at the same time, each with cpu_count // 2 threads.
        self.assertEqual(self.first.returncode, 0)
        out = self.jobs_out
        for name in ("ce", "seesaw"):
            shutil.rmtree(os.path.join(out, "runs", name, "seed0", "inference"))
        shutil.rmtree(os.path.join(out, "records"))
        args = self.args[:]
        args[args.index("--out") + 1] = out
        r = run_study(["--jobs", "2"] + args, self.env)
        self.assertEqual(r.returncode, 0, r.stdout[-3000:] + r.stderr[-3000:])
        threads = str(max(1, (os.cpu_count() or 1) // 2))
        self.assertIn(f"[study] 2 runs at a time, {threads} thread(s) each", r.stdout)
        self.assertIn("next: ce seed 0 (evaluate)", r.stdout)
        self.assertIn("next: seesaw seed 0 (evaluate)", r.stdout)
        spans = []
        for name in ("ce", "seesaw"):
            with open(os.path.join(out, "runs", name, "seed0", "study_run.json")) as f:
                last = json.load(f)["attempts"][-1]
            self.assertEqual((last["action"], last["threads"]), ("evaluate", threads))
            start = datetime.datetime.fromisoformat(last["started"]).timestamp()
            spans.append((start, start + last["wall_s"]))
        # The two evaluations overlapped in time: the later one started well before the earlier
        # one ended (each takes several seconds; run one after the other, they would not).
        self.assertLess(max(s for s, _ in spans) + 2.0, min(e for _, e in spans), spans)
        with open(os.path.join(out, "results.json")) as f:
            results = json.load(f)
        self.assertEqual([x["config"] for x in results["runs"]], ["ce", "seesaw"])
        for name in ("ce", "seesaw"):
            with open(os.path.join(out, "records", name, "seed0.json")) as f:
                rec = json.load(f)
            self.assertGreater(rec["timing"]["eval_only_wall_s"], 0)
            self.assertIn(threads, rec["timing"]["threads"])

    def test_dry_run_plans_resume_and_restart(self):
        self.assertEqual(self.first.returncode, 0)
        out = os.path.join(self.tmp, "dry")
        stopped = os.path.join(out, "runs", "ce", "seed1")
        crashed = os.path.join(out, "runs", "ce", "seed2")
        stale = os.path.join(out, "runs", "ce", "seed0")
        for d in (stopped, crashed, stale):
            os.makedirs(d)
        open(os.path.join(stopped, "last_checkpoint"), "w").close()
        # A trained folder whose attempts name no model-code commit or config (an older tool's):
        # it cannot stand for the current key, so it is trained again, not evaluated.
        open(os.path.join(stale, "model_final.pth"), "w").close()
        with open(os.path.join(stale, "study_run.json"), "w") as f:
            json.dump({"attempts": [{"action": "train", "returncode": 0}]}, f)
        open(os.path.join(crashed, "log.txt"), "w").close()
        args = ["--out", out, "--configs", "ce", "--dry-run", "--spec", "smoke"]
        r = run_study(args + ["--seeds", "0", "1", "2", "--num-classes", "12"], self.env)
        self.assertEqual(r.returncode, 0, r.stderr[-3000:])
        self.assertIn("[restart] ce seed 0", r.stdout)
        self.assertIn("[resume] ce seed 1", r.stdout)
        self.assertIn("[restart] ce seed 2", r.stdout)
        self.assertIn(" --resume ", r.stdout)
        self.assertIn("SEED 2", r.stdout)
        self.assertFalse(os.path.exists(os.path.join(out, "results.json")))
        self.assertTrue(os.path.isfile(os.path.join(crashed, "log.txt")))  # dry: nothing moved

    def test_bad_input_is_one_line(self):
        out = os.path.join(self.tmp, "bad")
        cases = [
            (["--configs", "ce", "nope"], "unknown config 'nope'"),
            (["--train-dataset", "no_such_dataset"], "unknown dataset 'no_such_dataset'"),
            (["--spec", "smoke", "--split", "test"], "has no test split"),
            (["--opts", "SEED", "3"], "may not set SEED"),
        ]
        for extra, message in cases:
            with self.subTest(message=message):
                r = run_study(["--out", out, "--dry-run"] + extra, self.env)
                self.assertNotEqual(r.returncode, 0)
                self.assertIn(message, r.stderr)
                self.assertNotIn("Traceback", r.stderr)
                # One line (library import warnings may come before it).
                last = r.stderr.strip().splitlines()[-1]
                self.assertTrue(last.startswith("error: ") and message in last, r.stderr)

    def test_other_settings_are_refused(self):
        self.assertEqual(self.first.returncode, 0)
        args = [a if a != "6" else "7" for a in self.args]  # --iters 7
        r = run_study(args, self.env)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("other settings (iters: 6, now 7)", r.stderr)
        self.assertNotIn("Traceback", r.stderr)


class TestChangedSinceStart(unittest.TestCase):
    """A run starts only with the model code and config its record will name."""

    def test_code_or_config_change_stops_new_runs(self):
        import types

        records = self.load_tool("study_records")
        ls = self.load_tool("longtail_study")
        path = os.path.join(ROOT, "configs", "study", "mask_rcnn_R_18_FPN_ce_study.yaml")
        study = types.SimpleNamespace(
            code_commit=records.code_commit()[0],
            config_sha1={"ce": records.config_sha1(path)},
        )
        run = types.SimpleNamespace(name="ce", config_file=path)
        self.assertEqual(ls.Study.changed_since_start(study, run), "")
        study.config_sha1["ce"] = "0" * 40
        self.assertIn("its config", ls.Study.changed_since_start(study, run))
        study.code_commit = "0" * 40
        self.assertIn("the model code", ls.Study.changed_since_start(study, run))


class TestSecondStages(unittest.TestCase):
    """A second stage (seesaw_dual_head) starts from its first stage's model of the same seed:
    the planner orders and waits, passes MODEL.WEIGHTS, and keys the record on the first stage.
    train_net.py is replaced by a stand-in that writes a model and metrics, so the test runs the
    study's own bookkeeping in seconds (the dual-head training itself: test_end_to_end)."""

    def setUp(self):
        self.ls = self.load_tool("longtail_study")
        self._tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self._tmp.cleanup)
        self.events, self.commands = [], {}
        self.fail = set()
        patches = {"execute": self.fake_execute, "prepare_weights": lambda study, runs: None}
        for name, value in patches.items():
            old = getattr(self.ls, name)
            setattr(self.ls, name, value)
            self.addCleanup(setattr, self.ls, name, old)

    def fake_execute(self, run, action, progress, env=None):
        import threading
        import time

        self.events.append(("start", run.label, threading.get_ident()))
        cmd = run.command(action)
        self.commands[run.label] = cmd
        # seesaw seed 0 runs longest: a free worker reaches its second stage while it runs.
        time.sleep(1.5 if run.label == "seesaw seed 0" else 0.3)
        rc = 1 if run.label in self.fail else 0
        if rc == 0:
            os.makedirs(run.dir, exist_ok=True)
            open(os.path.join(run.dir, "model_final.pth"), "w").close()
            for ds in run.study.eval_datasets:
                folder = os.path.join(run.dir, "inference", ds)
                os.makedirs(folder, exist_ok=True)
                metrics = {
                    t: dict.fromkeys(("AP", "APr", "APc", "APf"), 1.0) for t in ("bbox", "segm")
                }
                with open(os.path.join(folder, "lvis_metrics.json"), "w") as f:
                    json.dump(metrics, f)
        run.add_attempt(action, cmd, rc, wall_s=0.3)
        self.events.append(("end", run.label, threading.get_ident()))
        return rc

    def study(self, out, *extra):
        import contextlib
        import io

        argv = ["--out", out, "--spec", "smoke", "--iters", "6"] + list(extra)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                rc = self.ls.run_study(self.ls.parse_args(argv))
            except self.ls.StudyError as e:
                rc = f"error: {e}"
        return rc, buf.getvalue()

    def order(self, kind, label):
        return self.events.index(next(e for e in self.events if e[:2] == (kind, label)))

    def test_first_stage_trains_first_and_keys_the_second(self):
        out = os.path.join(self._tmp.name, "s")
        # The second stage named first, two seeds, two jobs: both first stages run side by side,
        # each second stage only after its own first stage ended.
        rc, text = self.study(out, "--configs", "seesaw_dual_head", "seesaw", "--seeds", "0", "1",
                              "--jobs", "2")  # fmt: skip
        self.assertEqual(rc, 0, text)
        for seed in (0, 1):
            first, second = f"seesaw seed {seed}", f"seesaw_dual_head seed {seed}"
            self.assertLess(self.order("end", first), self.order("start", second))
            weights = self.commands[second][self.commands[second].index("MODEL.WEIGHTS") + 1]
            self.assertEqual(weights, os.path.join(out, "runs", "seesaw", f"seed{seed}",
                                                   "model_final.pth"))  # fmt: skip
            records = os.path.join(out, "records")
            with open(os.path.join(records, "seesaw", f"seed{seed}.json")) as f:
                parent = json.load(f)
            with open(os.path.join(records, "seesaw_dual_head", f"seed{seed}.json")) as f:
                child = json.load(f)
            self.assertEqual(child["key"]["starts_from"], parent["key"])
            self.assertNotIn("starts_from", parent["key"])
        # The two first stages overlapped (two workers), so no core waited for a second stage.
        self.assertLess(self.order("start", "seesaw seed 1"), self.order("end", "seesaw seed 0"))
        # Again: every record stands, nothing runs.
        self.events.clear()
        rc, text = self.study(out, "--configs", "seesaw_dual_head", "--seeds", "0", "1")
        self.assertEqual(rc, 0, text)
        self.assertEqual(self.events, [])
        # A first stage trained again (another config sha1 in its key) makes its second stale.
        with open(os.path.join(out, "records", "seesaw", "seed0.json")) as f:
            rec = json.load(f)
        rec["key"]["config_sha1"] = "0" * 40
        with open(os.path.join(out, "records", "seesaw", "seed0.json"), "w") as f:
            json.dump(rec, f)
        rc, text = self.study(out, "--configs", "seesaw_dual_head", "--seeds", "0", "--dry-run")
        self.assertEqual(rc, 0, text)
        self.assertIn("[restart] seesaw_dual_head seed 0", text)

    def test_failed_first_stage_stops_its_second(self):
        out = os.path.join(self._tmp.name, "f")
        self.fail.add("seesaw seed 0")
        rc, text = self.study(out, "--configs", "seesaw", "seesaw_dual_head", "--seeds", "0", "1",
                              "--jobs", "2")  # fmt: skip
        self.assertEqual(rc, 1)
        self.assertIn("not starting seesaw_dual_head seed 0: seesaw seed 0 did not finish", text)
        started = [e[1] for e in self.events if e[0] == "start"]
        self.assertNotIn("seesaw_dual_head seed 0", started)
        self.assertIn("seesaw_dual_head seed 1", started)

    def test_second_stage_without_its_first_is_one_line(self):
        out = os.path.join(self._tmp.name, "e")
        rc, text = self.study(out, "--configs", "seesaw_dual_head", "--seeds", "0")
        self.assertIn("seesaw_dual_head seed 0 starts from the trained seesaw seed 0", str(rc))
        self.assertIn("add seesaw to --configs", str(rc))
        self.assertEqual(self.events, [])


class TestDifferences(unittest.TestCase):
    """The table's differences to the baseline, on hand-made summaries."""

    def setUp(self):
        self.ls = self.load_tool("study_report")  # tools/study_report.py (conftest.py)

    def test_exceeds_only_when_intervals_do_not_overlap(self):
        def stat(mean, std):
            return {"mean": mean, "std": std, "n": 3}

        self.assertEqual(self.ls.compare(stat(1.0, 0.5), stat(3.0, 0.5)), (2.0, 1.0, True))
        self.assertEqual(self.ls.compare(stat(1.0, 0.5), stat(1.5, 0.4))[2], False)
        self.assertEqual(self.ls.compare(stat(3.0, 0.25), stat(1.0, 0.25))[:2], (-2.0, 0.5))
        self.assertIsNone(self.ls.compare(stat(1.0, None), stat(3.0, 0.5)))  # one seed

        def entry(mean, std):
            return {t: {m: stat(mean, std) for m in self.ls.METRICS} for t, _ in self.ls.TASKS}

        summary = {"ce": entry(1.0, 0.5), "seesaw": entry(3.0, 0.5), "fasa": entry(1.5, 0.4)}
        lines = self.ls.compare_lines(summary)
        rows = [line for line in lines if line.startswith("| `")]
        self.assertEqual(len(rows), 2)
        self.assertIn("**+2.00 (1.00)**", rows[0])
        self.assertIn("+0.50 (0.90)", rows[1])
        self.assertNotIn("**", rows[1])
        diffs = self.ls.differences(summary)
        self.assertEqual(diffs["fasa"]["segm"]["APr"]["exceeds"], False)
        self.assertEqual(self.ls.compare_lines({"seesaw": entry(3.0, 0.5)}), [])  # no baseline


if __name__ == "__main__":
    unittest.main()
