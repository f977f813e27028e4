#!/usr/bin/env bash
# black, isort and flake8 (with the plugins its selected codes need) with the settings in
# pyproject.toml / setup.cfg, as detectron2 does. Installs the pinned tools when missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
if ! "$PY" -c 'import black, isort, flake8, bugbear, flake8_comprehensions' 2>/dev/null; then
  echo "[lint] installing black, isort, flake8, flake8-bugbear, flake8-comprehensions"
  "$PY" -m pip install --disable-pip-version-check -q -c requirements/constraints.txt \
    black isort flake8 flake8-bugbear flake8-comprehensions
fi
PATHS=(projects tests train_net.py benchmarks tools)
"$PY" -m black --check -q "${PATHS[@]}"
"$PY" -m isort --check-only -q --settings-path setup.cfg "${PATHS[@]}"
"$PY" -m flake8 "${PATHS[@]}"
echo "[lint] black, isort, flake8: clean"
