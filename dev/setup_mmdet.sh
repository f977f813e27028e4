#!/usr/bin/env bash
# The environment of tools/mmdet_equality.py: a virtual environment at .venv-mmdet that sees
# this machine's torch, detectron2 and fasa_seesaw (--system-site-packages) and adds
# mmengine 0.10.7, mmcv 2.1.0 built from source with its CPU ops, and mmdet 3.3.0 (which needs
# mmcv < 2.2.0). Only the equality check uses it; the project and its tests never import
# mmdetection. Idempotent; the mmcv build takes 10-30 minutes on 2 cores.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MMDET_VENV:-$ROOT/.venv-mmdet}"
PY="${PYTHON:-python}"

say() { echo "[setup_mmdet] $*"; }
fail() { echo "[setup_mmdet] ERROR: $*" >&2; exit 3; }

"$PY" -c 'import torch, detectron2, fasa_seesaw' 2>/dev/null \
  || fail "run dev/setup_env.sh first: torch, detectron2 and fasa_seesaw must import."
[ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
VPY="$VENV/bin/python"

if "$VPY" -c 'import mmcv, mmcv.ops, mmdet, mmengine; assert mmcv.__version__ == "2.1.0"' 2>/dev/null; then
  say "mmengine, mmcv 2.1.0 (with ops), mmdet 3.3.0: ok ($VENV)"
  exit 0
fi

say "installing mmengine 0.10.7 and mmcv's build dependencies"
"$VPY" -m pip install -q --disable-pip-version-check "mmengine==0.10.7" addict yapf \
  "opencv-python-headless<4.12" ninja wheel "setuptools<81" || fail "could not install mmengine."

# mmcv 2.1.0 has no wheel for this torch: build it from its source release with the CPU ops
# (no CUDA compiler here; FORCE_CUDA=0), against the torch already installed. Its setup.py asks
# for C++14/17; torch >= 2.9's headers need C++20, so the one change to the release is that flag.
SRC="$VENV/src"
mkdir -p "$SRC"
if [ ! -d "$SRC/mmcv-2.1.0" ]; then
  "$VPY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    --no-build-isolation "mmcv==2.1.0" -d "$SRC" 2>/dev/null \
    || "$VPY" -m pip download -q --disable-pip-version-check --no-deps --no-build-isolation \
      "mmcv==2.1.0" -d "$SRC" || true
  [ -f "$SRC/mmcv-2.1.0.tar.gz" ] || fail "could not download the mmcv 2.1.0 source release."
  tar -xzf "$SRC/mmcv-2.1.0.tar.gz" -C "$SRC"
fi
sed -i -e "s/-std=c++14/-std=c++20/g" -e "s/-std=c++17/-std=c++20/g" "$SRC/mmcv-2.1.0/setup.py"
say "building mmcv 2.1.0 with its CPU ops (MAX_JOBS=${MAX_JOBS:-2})"
MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" \
  "$VPY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
  "$SRC/mmcv-2.1.0" || fail "the mmcv 2.1.0 build failed (see the compiler output above)."

say "installing mmdet 3.3.0"
"$VPY" -m pip install -q --disable-pip-version-check --no-deps "mmdet==3.3.0" \
  || fail "could not install mmdet 3.3.0."
"$VPY" -m pip install -q --disable-pip-version-check terminaltables shapely scipy six \
  || fail "could not install mmdet's dependencies."
"$VPY" -c 'import mmcv.ops, mmdet; from mmcv.ops import RoIAlign, nms' \
  || fail "mmcv's ops do not import."
say "ready: $VPY tools/mmdet_equality.py"
