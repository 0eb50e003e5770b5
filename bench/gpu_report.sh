#!/usr/bin/env bash
# One command on a GPU machine (no network needed): GPU tests, compute-sanitizer
# memcheck on a small case, the full benchmark report; everything under one
# output folder, summary printed last. Budgeted to fit one 10-minute call.
#
#   bash bench/gpu_report.sh [OUT_DIR]            # default OUT_DIR: bench/results/gpu-run-<date>
#   bash bench/gpu_report.sh --dry-run [OUT_DIR]  # no GPU parts: checks the script end to end
#
# Without a CUDA device it runs in dry mode by itself: each GPU step is skipped
# with a message, and the rest (the sanitizer case on CPU, a tiny benchmark
# report, the summary) still runs.
# Env: PYTHON (default: the first of python, python3, /work/venv/bin/python that has torch),
#      MHPO_SKIP_BUILD=1 (use the extensions already built in place),
#      MHPO_BUILD_TIMEOUT / MHPO_PYTEST_TIMEOUT / MHPO_SANITIZER_TIMEOUT / MHPO_BENCH_TIMEOUT (seconds).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY=0
OUT=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) OUT="$arg" ;;
  esac
done
if [ -z "${PYTHON:-}" ]; then  # the first interpreter that has torch
  for cand in python python3 /work/venv/bin/python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import torch' >/dev/null 2>&1; then PYTHON=$cand; break; fi
  done
  PYTHON=${PYTHON:-python}
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY" = 0 ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_report: no CUDA device visible to torch -> dry mode"
  DRY=1
fi
STAMP=$(date -u +%Y%m%d-%H%M%S)
if [ -z "$OUT" ]; then
  if [ "$DRY" = 1 ]; then OUT="${TMPDIR:-/tmp}/mhpo-gpu-report-dry-$STAMP"; else OUT="bench/results/gpu-run-$STAMP"; fi
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
# 10-minute budget: build 110 + tests 170 + memcheck 80 + benchmark 200 s, plus slack
T_BUILD=${MHPO_BUILD_TIMEOUT:-110}
T_PYTEST=${MHPO_PYTEST_TIMEOUT:-170}
T_SAN=${MHPO_SANITIZER_TIMEOUT:-80}
T_BENCH=${MHPO_BENCH_TIMEOUT:-200}
STATUS=0

note "# mhpo-kernels GPU report $STAMP (dry=$DRY) -> $OUT"
"$PYTHON" - <<'EOF' 2>&1 | tee "$OUT/env.txt" | tee -a "$SUMMARY"
import json, torch
from mhpo_kernels import _bench_utils as bu
import mhpo_kernels as mk
dev = "cuda" if torch.cuda.is_available() else "cpu"
info = bu.env_info(dev)
info["backends"] = mk.available_backends(dev)
print(json.dumps(info))
EOF
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

# 0. native extensions, built here against this machine's torch -------------------
# (.so files never travel: they are gitignored and tied to the torch they were built with)
if [ "$DRY" = 1 ] || [ "${MHPO_SKIP_BUILD:-0}" = 1 ]; then
  note "[0/3] native build: SKIPPED"
else
  echo "[0/3] building the native extensions (timeout ${T_BUILD}s) ..."
  if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
    nv=$(readlink -f "$(command -v nvcc)")
    [ "$(head -c 2 "$nv")" = "#!" ] && nv=$(grep -o '/[^ "]*/bin/nvcc' "$nv" | head -1)
    export CUDA_HOME=$(dirname "$(dirname "$nv")")
  fi
  MAX_JOBS=${MAX_JOBS:-$(nproc)} timeout "$T_BUILD" "$PYTHON" setup.py build_ext --inplace > "$OUT/build.txt" 2>&1
  rc=$?
  note "[0/3] native build: rc=$rc, backends now: $("$PYTHON" -c 'import mhpo_kernels as mk; print(mk.available_backends("cuda"))' 2>&1 | tail -n 1)"
  [ $rc = 0 ] || STATUS=1
fi

# 1. GPU tests --------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  note "[1/3] pytest on GPU: SKIPPED (dry mode, no CUDA device)"
else
  echo "[1/3] pytest (GPU, timeout ${T_PYTEST}s) ..."
  # CPU-only suites (AOT compile, demo, gloo ranks, bench smoke) ran in CI already
  timeout "$T_PYTEST" "$PYTHON" -m pytest tests -q -p no:cacheprovider -m "not slow" \
      --deselect tests/test_bench_smoke.py --deselect tests/test_triton_aot.py \
      --deselect tests/test_demo.py --deselect tests/test_distributed.py > "$OUT/pytest.txt" 2>&1
  rc=$?
  note "[1/3] pytest: rc=$rc, $(tail -n 1 "$OUT/pytest.txt")"
  [ $rc = 0 ] || STATUS=1
fi

# 2. compute-sanitizer memcheck on a small case -------------------------------
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | head -n 1)
if [ "$DRY" = 1 ]; then
  note "[2/3] compute-sanitizer memcheck: SKIPPED (dry mode); running the case script on CPU instead"
  timeout "$T_SAN" "$PYTHON" bench/sanitizer_case.py --device cpu --quick > "$OUT/sanitizer_case_cpu.txt" 2>&1
  rc=$?
  note "      sanitizer case (CPU): rc=$rc, $(tail -n 1 "$OUT/sanitizer_case_cpu.txt")"
  [ $rc = 0 ] || STATUS=1
elif [ -z "$SAN" ]; then
  note "[2/3] compute-sanitizer: NOT FOUND (install the CUDA toolkit's compute-sanitizer); running the case without it"
  timeout "$T_SAN" "$PYTHON" bench/sanitizer_case.py > "$OUT/sanitizer_case.txt" 2>&1
  rc=$?
  note "      sanitizer case (no memcheck): rc=$rc, $(tail -n 1 "$OUT/sanitizer_case.txt")"
  [ $rc = 0 ] || STATUS=1
else
  echo "[2/3] compute-sanitizer memcheck (timeout ${T_SAN}s) ..."
  # no caching allocator: every tensor is its own allocation, so an overrun is caught
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$T_SAN" "$SAN" --tool memcheck --error-exitcode 3 \
      "$PYTHON" bench/sanitizer_case.py > "$OUT/memcheck.txt" 2>&1
  rc=$?
  errs=$(grep -E "ERROR SUMMARY" "$OUT/memcheck.txt" | tail -n 1)
  note "[2/3] memcheck: rc=$rc ${errs:-no summary line} ($(grep -E '^(OK|FAIL):' "$OUT/memcheck.txt" | tail -n 1))"
  [ $rc = 0 ] || STATUS=1
fi

# 3. benchmark report ---------------------------------------------------------
if [ "$DRY" = 1 ]; then
  note "[3/3] GPU benchmark: SKIPPED (dry mode); running the report pipeline on CPU with tiny shapes"
  timeout "$T_BENCH" "$PYTHON" bench/report.py --quick --no-subprocess --device cpu --ops mhpo_loss \
      --out "$OUT" --name dry-run > "$OUT/bench.txt" 2>&1
else
  echo "[3/3] benchmark report (timeout ${T_BENCH}s) ..."
  timeout "$T_BENCH" "$PYTHON" bench/report.py --device cuda --out "$OUT" > "$OUT/bench.txt" 2>&1
fi
rc=$?
note "[3/3] report: rc=$rc ($(ls "$OUT"/*.md 2>/dev/null | tr '\n' ' '))"
[ $rc = 0 ] || STATUS=1

echo
echo "===================================================================== summary"
# the report's own summary (everything after its separator line), then the step lines
awk 'f; /^=====+$/{f=1}' "$OUT/bench.txt"
cat "$SUMMARY"
echo "everything is under $OUT"
[ "$DRY" = 1 ] && echo "DRY RUN: GPU tests, memcheck and the GPU benchmark were skipped (no CUDA device)."
exit $STATUS
