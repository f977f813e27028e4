#!/usr/bin/env bash
# The test command: set up what is missing, then run the whole suite on CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/dev/setup_env.sh"
cd "$ROOT"
exec "${PYTHON:-python}" -m pytest tests -q "$@"
