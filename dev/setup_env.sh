#!/usr/bin/env bash
# Idempotent set-up of the current Python environment for fasa_seesaw: installs only what is
# missing. Exits non-zero with a message that says what is missing and how to install it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
CONSTRAINTS="$ROOT/requirements/constraints.txt"
TORCH_VERSION="2.14.1"
TORCHVISION_VERSION="0.29.1"
# detectron2 has no PyPI release; it is built from upstream source pinned to this commit.
DETECTRON2_COMMIT="02b5c4e295e990042a714712c21dc79b731e8833"
DETECTRON2_SOURCE="${DETECTRON2_SOURCE:-git+https://github.com/facebookresearch/detectron2.git@${DETECTRON2_COMMIT}}"

say() { echo "[setup] $*"; }
fail() { echo "[setup] ERROR: $*" >&2; exit 3; }
pip_install() { "$PY" -m pip install --disable-pip-version-check -q -c "$CONSTRAINTS" "$@"; }

"$PY" -c 'import sys; assert sys.version_info >= (3, 9)' \
  || fail "Python >= 3.9 is needed; found $("$PY" --version 2>&1)."

# 1. torch + torchvision: a matched pair whose compiled ops load (the registry's CUDA builds also
#    run on CPU-only machines).
if "$PY" -c 'import torch, torchvision, torchvision.ops as o; o.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)' 2>/dev/null; then
  say "torch $("$PY" -c 'import torch; print(torch.__version__)') with working torchvision ops: ok"
else
  say "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
  pip_install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
    || fail "could not install torch==$TORCH_VERSION and torchvision==$TORCHVISION_VERSION. Install a matching pair (https://pytorch.org/get-started/) and re-run."
fi

# 2. setuptools below 81: detectron2 imports pkg_resources, removed in setuptools 81.
if ! "$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) >= 81)' 2>/dev/null; then
  say "installing setuptools<81 (detectron2 needs pkg_resources)"
  "$PY" -m pip install -q "setuptools<81" wheel || fail "could not install setuptools<81."
fi

# 3. Pure-Python and binary-wheel dependencies: only the missing ones, so packages the user
#    already has are left at their versions.
missing=()
for pair in fvcore:fvcore iopath:iopath pycocotools:pycocotools lvis:lvis==0.5.3 hotcoco:hotcoco \
            sklearn:scikit-learn cv2:opencv-python matplotlib:matplotlib pytest:pytest; do
  module="${pair%%:*}"; package="${pair#*:}"
  "$PY" -c "import $module" 2>/dev/null || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
  say "fvcore, iopath, pycocotools, lvis, hotcoco, scikit-learn, opencv, matplotlib, pytest: ok"
else
  say "installing ${missing[*]}"
  pip_install "${missing[@]}" \
    || fail "could not install ${missing[*]} (is PyPI reachable?)."
fi

# 4. detectron2 from source, built against the installed torch (hence no build isolation).
if "$PY" -c 'import detectron2, detectron2._C' 2>/dev/null; then
  say "detectron2 $("$PY" -c 'import detectron2; print(detectron2.__version__)'): ok"
else
  say "building detectron2 from $DETECTRON2_SOURCE (1-10 minutes)"
  if ! pip_install --no-build-isolation "$DETECTRON2_SOURCE"; then
    fail "detectron2 is not installed and could not be built from
    $DETECTRON2_SOURCE
  (no network, or no compiler?). Install it, then re-run this command:
    $PY -m pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git@${DETECTRON2_COMMIT}'
  or, from a local clone checked out at that commit:
    DETECTRON2_SOURCE=/path/to/detectron2 bash dev/setup_env.sh"
  fi
fi

# 5. This project, editable, imported as fasa_seesaw.
if "$PY" - "$ROOT" <<'PYEOF' 2>/dev/null
import os, sys
import fasa_seesaw
sys.exit(0 if os.path.realpath(fasa_seesaw.__file__).startswith(os.path.realpath(sys.argv[1])) else 1)
PYEOF
then
  say "fasa_seesaw (editable, $ROOT): ok"
else
  say "installing fasa_seesaw in editable mode"
  pip_install --no-build-isolation --no-deps -e "$ROOT" || fail "could not install $ROOT."
fi
