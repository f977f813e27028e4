#!/usr/bin/env bash
# black, isort and flake8 with the settings in pyproject.toml / setup.cfg (as detectron2 does).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python -m black --check projects tests train_net.py benchmarks tools
python -m isort --check-only --settings-path setup.cfg projects tests train_net.py benchmarks tools
python -m flake8 projects tests train_net.py benchmarks tools
