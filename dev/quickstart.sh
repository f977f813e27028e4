#!/usr/bin/env bash
# The main job: set up what is missing, generate the built-in long-tailed dataset (cached), train
# Mask R-CNN with Seesaw Loss on it and print box and mask AP, APr, APc, APf.
# Extra arguments go to train_net.py, e.g. `bash dev/quickstart.sh --config-file ...`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/dev/setup_env.sh"
cd "$ROOT"
CONFIG="configs/quickstart/mask_rcnn_R_18_FPN_seesaw_quickstart.yaml"
# A fresh output folder per run: earlier runs' checkpoints are never overwritten.
OUT="output/quickstart_seesaw/$(date +%Y%m%d-%H%M%S)"
exec "${PYTHON:-python}" train_net.py --config-file "$CONFIG" "$@" OUTPUT_DIR "$OUT"
