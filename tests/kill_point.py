# Copyright (c) fasa_seesaw contributors.
"""
Run train_net.py and SIGKILL the process at one point of one checkpoint write, as a crash or an
out-of-memory kill would: ``python tests/kill_point.py POINT FILE -- <train_net.py args>``.

POINT is where the kill lands while FILE (a basename in OUTPUT_DIR) is written:
  mid_write      half of the file's bytes are on disk
  before_rename  the file is complete under its temporary name
  after_rename   the file is in place; last_checkpoint does not name it yet
FILE "last_checkpoint" with mid_write: half of the new last_checkpoint is on disk. FILE@n: the
n-th write of FILE (default: the first).
"""

import io
import os
import runpy
import signal
import sys

import fasa_seesaw.engine.checkpoint as checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    point, target = sys.argv[1], sys.argv[2]
    target, nth = (target.split("@") + ["1"])[:2]
    assert sys.argv[3] == "--"
    real_atomic_write, real_replace = checkpoint.atomic_write, os.replace
    writes = [0]

    def atomic_write(path, write):
        if os.path.basename(path) != target:
            return real_atomic_write(path, write)
        writes[0] += 1
        if writes[0] != int(nth):
            return real_atomic_write(path, write)
        if point == "mid_write":

            def half(f):
                buf = io.BytesIO()
                write(buf)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                die()

            return real_atomic_write(path, half)
        return real_atomic_write(path, write)

    def replace(src, dst):
        hit = os.path.basename(dst) == target and writes[0] == int(nth)
        if hit and point == "before_rename":
            die()
        real_replace(src, dst)
        if hit and point == "after_rename":
            die()

    checkpoint.atomic_write = atomic_write
    checkpoint.os.replace = replace  # the os module itself: train_net.py sees it too
    sys.argv = [os.path.join(ROOT, "train_net.py")] + sys.argv[4:]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
