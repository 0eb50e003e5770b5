#!/usr/bin/env bash
# One command on a GPU machine (no network needed), budgeted to fit one 10-minute call:
#   build    the native extensions against this machine's torch; check they load the shared C++ runtime
#   backends the backends this machine must have (MHPO_EXPECT_BACKENDS), checked before anything else runs
#   goals    the GPU targets of issues 11, 12 and 13, measured first: "goal: ... measured: ... PASS/FAIL"
#   profile  kernel launches, host syncs and work ops per mhpo_loss call (bench/launch_profile.py)
#   tests    the GPU test suite under pytest-xdist (-n 8: a crashing test costs one test, not the run)
#   memcheck compute-sanitizer memcheck on a small case
#   report   the full benchmark report (bench/report.py) with whatever time is left
#
#   bash bench/gpu_report.sh [OUT_DIR]            # default OUT_DIR: bench/results/gpu-run-<stamp>
#   bash bench/gpu_report.sh --dry-run [OUT_DIR]  # no GPU: every step on CPU at tiny sizes (a CI test)
#   bash bench/gpu_report.sh --steps goals,profile [OUT_DIR]
#   bash bench/gpu_report.sh "$OUT/gpu"           # on a lent device machine: the folder comes back whole
#
# OUT_DIR never holds more than 8 files (what one device call brings back): summary.txt, goals.txt,
# profile.txt, pytest.txt, the report's <name>.md and <name>.csv, and logs.tar.gz with everything else
# (build log, env, nvidia-smi, JUnit XML, JSON rows, plots, memcheck). They are refreshed after every
# step, so a run cut short keeps what finished. The summary (failing test ids included) prints last.
# Without a CUDA device the script switches to dry mode by itself.
# Peers: Liger-Kernel / Cut Cross-Entropy must be importable for the Liger goals (else NOT MEASURED).
# Env: PYTHON (default: the first of python, python3, /work/venv/bin/python that has torch),
#      MHPO_EXPECT_BACKENDS (default triton,cuda,cpu, dry cpu: each backend on its own device, the
#      rule of tests/util.py::device_for; also read by tests/test_backends.py), MHPO_STEPS (like --steps), MHPO_SKIP_BUILD=1 (use the extensions built in
#      place), MHPO_REPORT_BUDGET (seconds for the whole run, default 540), MHPO_PYTEST_WORKERS (default 8),
#      MHPO_PYTEST_ARGS (replaces the test selection), MHPO_BUILD_TIMEOUT / MHPO_GOALS_TIMEOUT /
#      MHPO_PROFILE_TIMEOUT / MHPO_PYTEST_TIMEOUT / MHPO_SANITIZER_TIMEOUT / MHPO_BENCH_TIMEOUT (seconds, each
#      also capped by what is left of the budget).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
START=$(date +%s)

DRY=0
OUT=""
STEPS=${MHPO_STEPS:-build,backends,goals,profile,tests,memcheck,report}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --steps) shift; STEPS=${1:-} ;;
    --steps=*) STEPS=${1#--steps=} ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) OUT="$1" ;;
  esac
  shift
done
for s in ${STEPS//,/ }; do
  case "$s" in build|backends|goals|profile|tests|memcheck|report) ;;
    *) echo "gpu_report: unknown step '$s' (build,backends,goals,profile,tests,memcheck,report)" >&2; exit 2 ;;
  esac
done
want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

if [ -z "${PYTHON:-}" ]; then  # the first interpreter that has torch
  for cand in python python3 /work/venv/bin/python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import torch' >/dev/null 2>&1; then PYTHON=$cand; break; fi
  done
  PYTHON=${PYTHON:-python}
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

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
W=$(mktemp -d "${TMPDIR:-/tmp}/mhpo-gpu-report-work.XXXXXX")  # everything; OUT gets copies + one tarball
SUMMARY="$W/summary.txt"
: > "$SUMMARY"
BUDGET=${MHPO_REPORT_BUDGET:-540}
STATUS=0
FAILED_STEPS=""
# each backend on its own device: triton and cuda on CUDA tensors, the native cpu backend on CPU tensors
if [ "$DRY" = 1 ]; then EXPECT=${MHPO_EXPECT_BACKENDS:-cpu}; else EXPECT=${MHPO_EXPECT_BACKENDS:-triton,cuda,cpu}; fi
export MHPO_EXPECT_BACKENDS="$EXPECT"

note() { echo "$*" | tee -a "$SUMMARY"; }
fail_step() { STATUS=1; FAILED_STEPS="$FAILED_STEPS $1"; }
# Copy the small files to OUT and pack the rest; called after every step and on exit.
publish() {
  cp -f "$SUMMARY" "$OUT/summary.txt" 2>/dev/null
  for f in goals.txt profile.txt pytest.txt; do [ -f "$W/$f" ] && cp -f "$W/$f" "$OUT/$f"; done
  for f in "$W"/report/*.md "$W"/report/*.csv; do [ -f "$f" ] && cp -f "$f" "$OUT/"; done
  tar -czf "$OUT/logs.tar.gz.part" -C "$W" . 2>/dev/null && mv -f "$OUT/logs.tar.gz.part" "$OUT/logs.tar.gz"
}
trap publish EXIT
# seconds for a step: its default, capped by the budget left (less a reserve for packing)
step_time() {
  local left=$(( BUDGET - ($(date +%s) - START) - 15 ))
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}
# run_step NAME DEFAULT_TIMEOUT LOG cmd...: runs cmd under timeout with its output in LOG; sets RC and TOOK
run_step() {
  local name=$1 t log=$3
  t=$(step_time "$2")
  shift 3
  if [ "$t" -lt 20 ]; then
    note "[$name] SKIPPED: out of time budget (${BUDGET}s, MHPO_REPORT_BUDGET)"
    RC=125; TOOK=0
    return
  fi
  echo "[$name] running (timeout ${t}s) ..."
  local t0=$(date +%s)
  timeout "$t" "$@" > "$log" 2>&1
  RC=$?
  TOOK=$(( $(date +%s) - t0 ))
  [ $RC = 124 ] && echo "[$name] TIMED OUT after ${t}s" >> "$log"
}
rc_word() { case "$1" in 0) echo "ok" ;; 124) echo "TIMED OUT" ;; 125) echo "skipped" ;; *) echo "rc=$1" ;; esac; }

note "# mhpo-kernels GPU report $STAMP (dry=$DRY, steps $STEPS, budget ${BUDGET}s) -> $OUT"
"$PYTHON" - <<'EOF' > "$W/env.txt" 2>&1
import json, torch
from mhpo_kernels.tools import bench_utils as bu
import mhpo_kernels as mk
dev = "cuda" if torch.cuda.is_available() else "cpu"
info = bu.env_info(dev)
info["backends"] = {d: mk.available_backends(d) for d in (["cuda", "cpu"] if dev == "cuda" else ["cpu"])}
print(json.dumps(info))
EOF
note "env: $(tail -n 1 "$W/env.txt")"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi > "$W/nvidia-smi.txt" 2>&1
publish

# build: native extensions against this machine's torch (.so files never travel) ------------------
if want build; then
  if [ "$DRY" = 1 ] || [ "${MHPO_SKIP_BUILD:-0}" = 1 ]; then
    note "[build] SKIPPED ($([ "$DRY" = 1 ] && echo "dry mode" || echo "MHPO_SKIP_BUILD=1")): using the extensions built in place"
  else
    if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
      nv=$(readlink -f "$(command -v nvcc)")
      [ "$(head -c 2 "$nv")" = "#!" ] && nv=$(grep -o '/[^ "]*/bin/nvcc' "$nv" | head -1)
      export CUDA_HOME=$(dirname "$(dirname "$nv")")
    fi
    MAX_JOBS=${MAX_JOBS:-$(nproc)} MHPO_BUILD_CUDA=${MHPO_BUILD_CUDA:-1} \
      run_step build "${MHPO_BUILD_TIMEOUT:-150}" "$W/build.txt" "$PYTHON" setup.py build_ext --inplace
    note "[build] $(rc_word $RC) in ${TOOK}s (CUDA_HOME=${CUDA_HOME:-unset}; log build.txt)"
    [ $RC = 0 ] || fail_step build
  fi
  "$PYTHON" bench/gpu_report_tools.py link mhpo_kernels/_C_*.so > "$W/link.txt" 2>&1
  sed 's/^/[link] /' "$W/link.txt" | tee -a "$SUMMARY"
  publish
fi

# backends: what this machine must have; a missing one fails here, loudly --------------------------
if want backends; then
  "$PYTHON" bench/gpu_report_tools.py backends "$EXPECT" > "$W/backends.txt" 2>&1
  rc=$?
  sed 's/^/[backends] /' "$W/backends.txt" | tee -a "$SUMMARY"
  if [ $rc != 0 ]; then
    note "[backends] FAIL: MHPO_EXPECT_BACKENDS=$EXPECT is not met (see the lines above; build.txt says why)"
    fail_step backends
  fi
  publish
fi

# goals: the GPU targets of issues 11, 12, 13, first thing -------------------------------------------
count_verdicts() {  # tally of the goal lines in a file
  grep '^goal: ' "$1" 2>/dev/null | awk '{ if (/ NOT IMPLEMENTED$/) v="NOT IMPLEMENTED"; else if (/ NOT MEASURED$/) v="NOT MEASURED"; else v=$NF; n[v]++ }
    END { s=""; for (k in n) s = s (s ? ", " : "") n[k] " " k; print (s ? s : "no goal lines") }'
}
if want goals; then
  if [ "$DRY" = 1 ]; then args=(--device cpu --dry --repeats 2); else args=(--device cuda); fi
  run_step goals "${MHPO_GOALS_TIMEOUT:-200}" "$W/goals.txt" "$PYTHON" bench/gpu_goals.py "${args[@]}" --json "$W/goals.json"
  note "[goals] $(rc_word $RC) in ${TOOK}s: $(count_verdicts "$W/goals.txt")"
  grep '^goal: ' "$W/goals.txt" | tee -a "$SUMMARY"
  [ $RC = 0 ] || fail_step goals
  publish
fi

# profile: launches / syncs / work ops per call ------------------------------------------------------
if want profile; then
  if [ "$DRY" = 1 ]; then args=(--device cpu --calls 2); else args=(--device all); fi
  run_step profile "${MHPO_PROFILE_TIMEOUT:-90}" "$W/profile.txt" "$PYTHON" bench/launch_profile.py "${args[@]}" --json "$W/profile.json"
  note "[profile] $(rc_word $RC) in ${TOOK}s: $(count_verdicts "$W/profile.txt")"
  grep '^goal: ' "$W/profile.txt" | tee -a "$SUMMARY"
  [ $RC = 0 ] || fail_step profile
  publish
fi

# tests: the GPU suite under pytest-xdist ----------------------------------------------------------
if want tests; then
  if [ -n "${MHPO_PYTEST_ARGS:-}" ]; then
    read -r -a sel <<< "$MHPO_PYTEST_ARGS"
  elif [ "$DRY" = 1 ]; then  # the pipeline on CPU: one quick test through the same options and summary
    sel=(tests/test_bench_smoke.py::test_bench_utils_quantiles_and_memory)
  else  # CPU-only suites (AOT compile, gloo ranks, this script's own smoke test) ran in CI already
    sel=(tests -m "not slow" --deselect tests/test_bench_smoke.py --deselect tests/test_triton_aot.py
         --deselect tests/test_distributed.py)
  fi
  xd=()
  nw=${MHPO_PYTEST_WORKERS:-8}
  if "$PYTHON" -c 'import xdist' >/dev/null 2>&1 && [ "$nw" != 0 ]; then
    xd=(-n "$nw")
    how="pytest -n $nw"
  else
    how="pytest (NO pytest-xdist: one crashing test ends the run)"
    [ "$DRY" = 1 ] || note "[tests] WARNING: pytest-xdist missing; a crash will hide every test after it"
  fi
  run_step tests "${MHPO_PYTEST_TIMEOUT:-240}" "$W/pytest.txt" "$PYTHON" -m pytest -v -rfE -p no:cacheprovider \
      "${xd[@]}" --junitxml="$W/junit.xml" -o junit_family=xunit1 "${sel[@]}"
  "$PYTHON" bench/gpu_report_tools.py tests "$W/pytest.txt" "$W/junit.xml" > "$W/tests-summary.txt" 2>&1
  trc=$?
  note "[tests] $how: $(rc_word $RC) in ${TOOK}s: $(head -n 1 "$W/tests-summary.txt")"
  tail -n +2 "$W/tests-summary.txt" | sed 's/^/[tests] /' | tee -a "$SUMMARY"
  { [ $RC = 0 ] && [ $trc = 0 ]; } || fail_step tests
  publish
fi

# memcheck: compute-sanitizer on a small case ---------------------------------------------------------
if want memcheck; then
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | head -n 1)
  if [ "$DRY" = 1 ]; then
    run_step memcheck "${MHPO_SANITIZER_TIMEOUT:-120}" "$W/sanitizer_case_cpu.txt" "$PYTHON" bench/sanitizer_case.py --device cpu --quick
    note "[memcheck] SKIPPED (dry mode); the case script on CPU: $(rc_word $RC) in ${TOOK}s, $(tail -n 1 "$W/sanitizer_case_cpu.txt")"
  elif [ -z "$SAN" ]; then
    run_step memcheck "${MHPO_SANITIZER_TIMEOUT:-120}" "$W/sanitizer_case.txt" "$PYTHON" bench/sanitizer_case.py
    note "[memcheck] compute-sanitizer NOT FOUND; the case without it: $(rc_word $RC), $(tail -n 1 "$W/sanitizer_case.txt")"
  else
    # no caching allocator: every tensor is its own allocation, so an overrun is caught
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step memcheck "${MHPO_SANITIZER_TIMEOUT:-120}" "$W/memcheck.txt" \
        "$SAN" --tool memcheck --error-exitcode 3 "$PYTHON" bench/sanitizer_case.py
    errs=$(grep -E "ERROR SUMMARY" "$W/memcheck.txt" | tail -n 1)
    note "[memcheck] $(rc_word $RC) in ${TOOK}s: ${errs:-no summary line} ($(grep -E '^(OK|FAIL):' "$W/memcheck.txt" | tail -n 1))"
  fi
  [ $RC = 0 ] || fail_step memcheck
  publish
fi

# report: the full benchmark report with the time that is left ----------------------------------------
if want report; then
  mkdir -p "$W/report"
  if [ "$DRY" = 1 ]; then
    run_step report "${MHPO_BENCH_TIMEOUT:-200}" "$W/bench.txt" "$PYTHON" bench/report.py --quick --no-subprocess \
        --device cpu --ops mhpo_loss --out "$W/report" --name dry-run
  else
    ops=()
    left=$(( BUDGET - ($(date +%s) - START) ))
    if [ "$left" -lt 200 ]; then  # the goals step measured the fused lm_head loss already: keep the logits ops
      ops=(--ops mhpo_loss token_logprobs)
      note "[report] ${left}s left: the logits ops only (fused_linear dropped; its goals are measured above)"
    fi
    run_step report "${MHPO_BENCH_TIMEOUT:-300}" "$W/bench.txt" "$PYTHON" bench/report.py --device cuda "${ops[@]}" --out "$W/report"
  fi
  note "[report] $(rc_word $RC) in ${TOOK}s: $(cd "$W/report" && ls *.md 2>/dev/null | tr '\n' ' ')(bench.txt in logs.tar.gz)"
  [ $RC = 0 ] || fail_step report
  publish
fi

total=$(( $(date +%s) - START ))
goal_file=$(mktemp); cat "$W/goals.txt" "$W/profile.txt" 2>/dev/null | grep '^goal: ' > "$goal_file"
if [ $STATUS = 0 ]; then
  note "RESULT: every step passed in ${total}s; goals: $(count_verdicts "$goal_file")"
else
  note "RESULT: FAILED steps:${FAILED_STEPS} (${total}s); goals: $(count_verdicts "$goal_file")"
fi
rm -f "$goal_file"
publish
n=$(find "$OUT" -maxdepth 1 -type f | wc -l)
[ "$n" -le 8 ] || echo "gpu_report: WARNING: $OUT holds $n files (a device call brings back 8)"

echo
echo "===================================================================== summary"
cat "$SUMMARY"
echo "everything is under $OUT ($n files; logs.tar.gz holds the rest: tar -xzf logs.tar.gz)"
rm -rf "$W"
trap - EXIT
[ "$DRY" = 1 ] && echo "DRY RUN: no CUDA device: tests, memcheck, goals and the benchmark ran on CPU at tiny sizes (not judged)."
exit $STATUS
