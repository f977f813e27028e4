# Copyright (c) fasa_seesaw contributors.
"""
What the benchmark scripts share: the guard against a busy machine (wait for a quiet one,
measure other processes' CPU while timing), the device and thread options, interleaved timers,
memory counters read from /proc/self/status, and LVIS v1 class statistics.

The benchmarks run as scripts (``python benchmarks/bench_x.py``), so their folder is on sys.path
and they import this module as ``from common import ...``. torch is imported only where a
function needs it, so a benchmark that does not use torch does not load it through this module.
"""

import json
import numpy as np
import os
import platform
import sys
import time

BUSY_CORES = 0.25  # other processes' CPU above which timings are called unreliable


# --------------------------------------------------------------------------------------------
# machine state
# --------------------------------------------------------------------------------------------
def _proc_stat():
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    # fields: user nice system idle iowait irq softirq steal
    return sum(v), sum(v) - v[3] - v[4]


def busy_cores(window):
    """Cores busy (all processes) over `window` seconds; None if /proc/stat is unreadable."""
    a = _proc_stat()
    t0 = os.times()
    time.sleep(window)
    b = _proc_stat()
    t1 = os.times()
    if a is None or b is None or b[0] == a[0]:
        return None
    own = (t1.user + t1.system - t0.user - t0.system) / window
    return max((os.cpu_count() or 1) * (b[1] - a[1]) / (b[0] - a[0]) - own, 0.0)


def wait_until_quiet(args, label):
    """Blocks until other processes use < args.quiet_cores cores; returns the load seen."""
    if args.quiet_timeout <= 0:
        load = busy_cores(1.0)
        print(f"[{label}] background load (no waiting): {_fmt_load(load)}", flush=True)
        return {"waited_s": 0.0, "background_cores": load, "quiet": None}
    t0 = time.perf_counter()
    first = True
    while True:
        load = busy_cores(args.quiet_window)
        waited = time.perf_counter() - t0
        if load is None or load < args.quiet_cores:
            print(
                f"[{label}] machine quiet after {waited:.0f} s: background load "
                f"{_fmt_load(load)} over {args.quiet_window:g} s",
                flush=True,
            )
            return {"waited_s": waited, "background_cores": load, "quiet": True}
        if waited >= args.quiet_timeout:
            print(
                f"[{label}] WARNING: never quiet within {args.quiet_timeout:g} s (background "
                f"load {_fmt_load(load)}); timing anyway, results will be noisy",
                flush=True,
            )
            return {"waited_s": waited, "background_cores": load, "quiet": False}
        if first:
            print(
                f"[{label}] waiting for a quiet machine (background load {_fmt_load(load)} >= "
                f"{args.quiet_cores:g} cores) ...",
                flush=True,
            )
            first = False


def _fmt_load(load):
    return "n/a" if load is None else f"{load:.2f} of {os.cpu_count()} cores"


class ForeignCpu:
    """
    CPU used by *other* processes while timing, in cores on average (Linux only: /proc/stat
    minus this process and its children). A busy machine makes multi-threaded CPU timings
    meaningless (OpenMP barriers wait on descheduled threads), so the benchmarks report it
    instead of hiding it. The busy share is taken relative to all ticks, so the tick rate does
    not matter.
    """

    @staticmethod
    def _snap():
        s = _proc_stat()
        if s is None:
            return None
        t = os.times()
        return (
            s[0],
            s[1],
            t.user + t.system + t.children_user + t.children_system,
            time.perf_counter(),
        )

    def __enter__(self):
        self.start = self._snap()
        self.cores = None
        return self

    def __exit__(self, *exc):
        end = self._snap()
        if self.start is None or end is None:
            return False
        total, busy, own, wall = (e - s for e, s in zip(end, self.start))
        if total > 0 and wall > 0:
            self.cores = max((os.cpu_count() or 1) * busy / total - own / wall, 0.0)
        return False

    def report(self, what):
        report_foreign(self.cores, what)


def report_foreign(cores, what):
    if cores is None:
        return
    warn = cores > BUSY_CORES
    print(
        f"other processes used {cores:.2f} of {os.cpu_count()} cores during {what}"
        + (" -- WARNING: machine busy, timings are not reliable; re-run when idle" if warn else "")
    )


def run_when_quiet(args, label, fn, attempts=3):
    """
    Wait for a quiet machine, run fn() and measure other processes' CPU meanwhile; if they were
    busy, wait and run it again (at most `attempts` runs). Returns (result, cores, runs).
    """
    for i in range(1, attempts + 1):
        wait_until_quiet(args, label)
        with ForeignCpu() as foreign:
            out = fn()
        if (foreign.cores or 0.0) <= BUSY_CORES or i == attempts:
            return out, foreign.cores, i
        print(
            f"[{label}] other processes used {foreign.cores:.2f} cores meanwhile: run again",
            flush=True,
        )


def add_quiet_args(ap):
    """The options of wait_until_quiet, as an argument group of `ap`."""
    g = ap.add_argument_group(
        "waiting for a quiet machine",
        "The machine may be shared: before each part the benchmark waits (up to\n"
        "--quiet-timeout s) until the other processes use less than --quiet-cores cores over\n"
        "--quiet-window s, prints the measured background load, and warns when other processes\n"
        "used CPU during timing.",
    )
    g.add_argument("--quiet-cores", type=float, default=0.15, help="busy cores that count as quiet")
    g.add_argument("--quiet-window", type=float, default=3.0, help="seconds per load sample")
    g.add_argument(
        "--quiet-timeout",
        type=float,
        default=1200.0,
        help="max seconds to wait per part (0: do not wait)",
    )
    return g


# --------------------------------------------------------------------------------------------
# device and threads
# --------------------------------------------------------------------------------------------
def default_threads():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def add_device_args(ap):
    """--device, --threads, --seed and --json, as every torch benchmark takes them."""
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: all available cores)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="OUT", default=None, help="write the results to OUT")


def init_device(ap, args):
    """The torch.device of --device (an argparse error if CUDA is missing) and the thread count
    set from --threads. Returns (device, threads)."""
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda requested but torch.cuda.is_available() is False")
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    return device, threads


def sync(device):
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def device_name(device):
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def stats_ms(t):
    return {
        "median_ms": float(np.median(t)),
        "p10_ms": float(np.percentile(t, 10)),
        "p90_ms": float(np.percentile(t, 90)),
        "min_ms": float(np.min(t)),
        "times_ms": [float(v) for v in t],
    }


def stats_vs_base(times, name, base, digits=3):
    """stats_ms of ``times[name]`` plus the median, p10 and p90 over repetitions of its time
    divided by ``times[base]`` of the same repetition; and the table cell that shows them
    ("(base)" for the base itself). Returns (stats, cell)."""
    r = stats_ms(times[name])
    ratio = np.asarray(times[name]) / np.asarray(times[base])
    r["ratio_median"] = float(np.median(ratio))
    r["ratio_p10"] = float(np.percentile(ratio, 10))
    r["ratio_p90"] = float(np.percentile(ratio, 90))
    cell = (
        "(base)"
        if name == base
        else f"{r['ratio_median']:.{digits}f} [{r['ratio_p10']:.{digits}f}, "
        f"{r['ratio_p90']:.{digits}f}]"
    )
    return r, cell


def time_interleaved(steps, device, warmup, reps, before_each=None, guard=None, info=None):
    """
    Warm up each, then interleave the repetitions so drift affects every variant alike; the
    order is reversed on every other repetition so no variant always runs first or last.

    guard: (args, label) to discard a repetition during which other processes used more than
    0.25 cores, wait for a quiet machine and repeat it (at most `reps` times in all); only
    meaningful for repetitions of seconds, not milliseconds. info (dict) receives the count.
    """
    for step in steps.values():
        for w in range(warmup):
            if before_each:
                before_each(-1 - w)
            step()
    sync(device)
    times = {name: [] for name in steps}
    r = discarded = 0
    kept_busy = kept_wall = 0.0
    while r < reps:
        order = list(steps.items())
        rep = {}
        with ForeignCpu() as foreign:
            for name, step in order if r % 2 == 0 else order[::-1]:
                if before_each:
                    before_each(r)
                sync(device)
                t0 = time.perf_counter()
                step()
                sync(device)
                rep[name] = (time.perf_counter() - t0) * 1e3
        if guard is not None and (foreign.cores or 0.0) > BUSY_CORES and discarded < reps:
            discarded += 1
            print(
                f"[{guard[1]}] repetition {r + 1} discarded: other processes used "
                f"{foreign.cores:.2f} cores during it",
                flush=True,
            )
            wait_until_quiet(guard[0], guard[1])
            continue
        for name, t in rep.items():
            times[name].append(t)
        if foreign.cores is not None:
            wall = sum(rep.values())
            kept_busy += foreign.cores * wall
            kept_wall += wall
        r += 1
    if info is not None:
        info["discarded_repetitions"] = discarded
        info["other_processes_cores"] = kept_busy / kept_wall if kept_wall > 0 else None
    return times


# --------------------------------------------------------------------------------------------
# memory (Linux: /proc/self)
# --------------------------------------------------------------------------------------------
def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _rss_kb():
    return _status_kb("VmRSS")


def _hwm_kb():
    return _status_kb("VmHWM")


def _reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# LVIS class statistics and output
# --------------------------------------------------------------------------------------------
def lvis_image_counts():
    """Images per LVIS v1 category, by category id (detectron2's lvis_v1_category_image_count;
    LVIS ships no instance counts with detectron2)."""
    from detectron2.data.datasets.lvis_v1_category_image_count import LVIS_CATEGORY_IMAGE_COUNT

    cats = sorted(LVIS_CATEGORY_IMAGE_COUNT, key=lambda c: c["id"])
    return np.array([c["image_count"] for c in cats], dtype=np.float64)


def run_config(options, threads, device, **extra):
    """The "config" entry of a benchmark's --json: its options, then the software and machine."""
    import torch

    return {
        **options,
        "threads": threads,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "device_name": device_name(device),
        **extra,
    }


def write_json(path, out):
    with open(path, "w") as f:
        # numpy scalars (np.bool_, np.float64 ...) as plain Python values
        json.dump(out, f, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
