#!/usr/bin/env bash
# Everything that needs an accelerator, in one go (sized for under 10 minutes on one GPU; not
# yet timed on one):
#   1. the CUDA variants of the tests (skipped on CPU-only machines): CUDA random states across
#      FASA's validation pass, and the long-tail state all-reduced on the GPU (gloo on one GPU,
#      NCCL across two: skipped, and reported so, with fewer than 2 GPUs);
#   2. benchmarks/bench_seesaw_loss.py --device cuda;
#   3. benchmarks/bench_fasa.py --device cuda (step and generation parts).
# Writes one json of figures: OUT_DIR/device_check.json (OUT_DIR: $1, default output/device_check).
#
#   bash dev/device_check.sh [OUT_DIR]
#   DRY_RUN=1 bash dev/device_check.sh [OUT_DIR]   # any machine: checks that every step exists
#                                                 # (tests collected, benchmark flags accepted)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
OUT="${1:-output/device_check}"
mkdir -p "$OUT"
CUDA_TESTS=(
  "tests/test_fasa_adaptation.py::TestRNGStates::test_cuda_generators_are_captured"
  "tests/test_fasa_adaptation.py::TestValidationPass::test_pass_restores_cuda_generators"
  "tests/test_fasa_distributed.py::TestFASADistributed::test_cuda_state_all_reduced_by_gloo"
  "tests/test_fasa_distributed.py::TestFASADistributed::test_cuda_state_all_reduced_by_nccl"
)
SEESAW=("$PY" benchmarks/bench_seesaw_loss.py --device cuda --json "$OUT/bench_seesaw_loss.json")
FASA=("$PY" benchmarks/bench_fasa.py --part step --device cuda --json "$OUT/bench_fasa_step.json")
FASA_GEN=("$PY" benchmarks/bench_fasa.py --part generation --device cuda
          --json "$OUT/bench_fasa_generation.json")

if [[ -n "${DRY_RUN:-}" ]]; then
  "$PY" -m pytest -q --collect-only "${CUDA_TESTS[@]}" -p no:cacheprovider > "$OUT/collect.txt" \
    || true
  grep -q "${#CUDA_TESTS[@]} tests collected" "$OUT/collect.txt" \
    || { cat "$OUT/collect.txt"; echo "[device_check] a CUDA test is missing" >&2; exit 1; }
  # The flags each benchmark's argparse defines: its usage block (--help up to the first blank
  # line), not the description below it.
  for bench in benchmarks/bench_seesaw_loss.py benchmarks/bench_fasa.py; do
    usage="$("$PY" "$bench" --help | sed '/^$/q')"
    flags=(--device --json)
    [[ "$bench" == *bench_fasa.py ]] && flags+=(--part)
    for flag in "${flags[@]}"; do
      grep -q -- "\[$flag" <<<"$usage" \
        || { echo "[device_check] $bench has no $flag option" >&2; exit 1; }
    done
  done
  echo "[device_check] dry run: ${#CUDA_TESTS[@]} CUDA tests collected; would run:"
  printf '  %s\n' "${SEESAW[*]}" "${FASA[*]}" "${FASA_GEN[*]}"
  exit 0
fi

"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")'
status=0
"$PY" -m pytest -q -rs "${CUDA_TESTS[@]}" --junitxml "$OUT/cuda_tests.xml" -p no:cacheprovider \
  | tee "$OUT/cuda_tests.txt" || status=1
"${SEESAW[@]}" > "$OUT/bench_seesaw_loss.txt" || status=1
"${FASA[@]}" > "$OUT/bench_fasa_step.txt" || status=1
"${FASA_GEN[@]}" > "$OUT/bench_fasa_generation.txt" || status=1
"$PY" - "$OUT" <<'PYEOF'
import json, os, sys, torch
import xml.etree.ElementTree as ET
out = sys.argv[1]
suite = ET.parse(os.path.join(out, "cuda_tests.xml")).getroot().iter("testcase")
tests = {}
for case in suite:
    result = "passed"
    for kind in ("failure", "error", "skipped"):
        node = case.find(kind)
        if node is not None:
            result = f"{kind}: {node.get('message', '')}"
    tests[f"{case.get('classname')}.{case.get('name')}"] = result
figures = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
           "torch": torch.__version__, "cuda_tests": tests}
for name in ("bench_seesaw_loss", "bench_fasa_step", "bench_fasa_generation"):
    path = os.path.join(out, f"{name}.json")
    figures[name] = json.load(open(path)) if os.path.exists(path) else "not written"
with open(os.path.join(out, "device_check.json"), "w") as f:
    json.dump(figures, f, indent=1)
print(f"[device_check] wrote {os.path.join(out, 'device_check.json')}")
PYEOF
exit $status
