#!/usr/bin/env bash
# CI, second leg: the oldest torch the package claims, torch==2.11.0 (the GPU machine's;
# it brings Triton 3.6). torch.compile + inplace_backward once broke there and not on
# the torch of the main leg: torch.compiler.is_compiling() is not set while AOTAutograd
# traces on 2.11.
#
# * A venv with torch==2.11.0, numpy, pytest, ninja, cached between runs under
#   ${MHPO_CI_CACHE:-~/.cache/mhpo-ci}/venv-torch-2.11.0 (rebuilt when it does not import
#   the torch and the requirements below); the first run downloads several GB.
# * The package built in a temporary copy of the tree against that torch: the CPU
#   extension, and the CUDA one where a toolkit is found (found as in .ci/run;
#   MHPO_OLDEST_CUDA=0 skips it).
# * The torch-sensitive tests, imported from that copy (checked afterwards): test_native,
#   test_api (compile, opcheck), test_backends with a thinner grid (no bf16 / fp16 at
#   V=32781), the policy compile test.
# Independent of the caller's venv. On 2 idle cores: warm ~5 min (build 1.5 min, of which
# the CUDA extension ~0.5 min; tests 3 min), cold ~8 min (the venv: 3 min, 4.7 GB installed);
# about twice that on a busy machine.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
start=$(date +%s)
say() { echo "oldest-torch: $*"; }
since() { echo "$(( $(date +%s) - $1 ))s"; }

TORCH_VERSION=2.11.0
# numpy < 2.4: Triton 3.6's interpreter calls int() on 1-element arrays, an error from numpy 2.4 on.
REQUIREMENTS=("torch==$TORCH_VERSION" "numpy<2.4" pytest ninja)
CACHE=${MHPO_CI_CACHE:-$HOME/.cache/mhpo-ci}
VENV=$CACHE/venv-torch-$TORCH_VERSION
PYTHON=${MHPO_CI_PYTHON:-python3}
mkdir -p "$CACHE"

venv_ok() {  # the cached venv imports what the requirements name, at those versions
    [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.mhpo-requirements" 2>/dev/null)" = "${REQUIREMENTS[*]}" ] \
        && "$VENV/bin/python" - "$TORCH_VERSION" >/dev/null 2>&1 <<'EOF'
import sys
import ninja, numpy, pytest, torch, triton  # noqa: F401
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
assert tuple(int(x) for x in numpy.__version__.split(".")[:2]) < (2, 4), numpy.__version__
EOF
}

# ------------------------------------------------------------------ the venv (one writer at a time)
t=$(date +%s)
exec 9>"$VENV.lock"
flock 9
if venv_ok; then
    say "reusing $VENV"
else
    say "creating $VENV (${REQUIREMENTS[*]})"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q "${REQUIREMENTS[@]}"
    echo "${REQUIREMENTS[*]}" > "$VENV/.mhpo-requirements"
    venv_ok || { say "FAILED: the new venv does not import torch $TORCH_VERSION and the requirements"; exit 1; }
fi
flock -u 9
venv_time=$(since "$t")
PY=$VENV/bin/python
say "$("$PY" -c 'import numpy, torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}")') ($venv_time)"

# ------------------------------------------------------------------ a copy of the tree, built
tmp=$(mktemp -d "${TMPDIR:-/tmp}/mhpo-oldest-torch.XXXXXX")
if [ "${MHPO_KEEP_TMP:-0}" = 1 ]; then say "keeping $tmp"; else trap 'rm -rf "$tmp"' EXIT; fi
cd "$root"  # top-level files and the packages, without build outputs or the editable install's extensions
find . -maxdepth 1 -type f -print0 \
    | tar -cf - --exclude='*.so' --exclude=__pycache__ --exclude='*.egg-info' --null -T - \
        csrc mhpo_kernels triton_kernels tests \
    | tar -xf - -C "$tmp"
cd "$tmp"

t=$(date +%s)
export MAX_JOBS=${MAX_JOBS:-2} MHPO_BUILD_NATIVE=1 MHPO_BUILD_CUDA=0
if [ "${MHPO_OLDEST_CUDA:-auto}" != 0 ] && command -v nvcc >/dev/null 2>&1; then  # as .ci/run finds it
    real_nvcc=$(readlink -f "$(command -v nvcc)")
    if [ "$(head -c 2 "$real_nvcc")" = "#!" ]; then  # a wrapper script: find the binary it execs
        real_nvcc=$(grep -o '/[^ "]*/bin/nvcc' "$real_nvcc" | head -1)
    fi
    export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$real_nvcc")")}
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    [ -d "$site/nvidia/cu13/include" ] && export CPATH="$site/nvidia/cu13/include${CPATH:+:$CPATH}"
    export MHPO_BUILD_CUDA=1
fi
say "building in $tmp (MHPO_BUILD_CUDA=$MHPO_BUILD_CUDA${CUDA_HOME:+, CUDA_HOME=$CUDA_HOME})"
if ! "$PY" setup.py build_ext --inplace -q >build.log 2>&1; then
    cat build.log
    say "FAILED to build"
    exit 1
fi
build_time=$(since "$t")
say "built $(cd mhpo_kernels && ls _C_*.so | tr '\n' ' ')($build_time)"

# ------------------------------------------------------------------ the tests, from this copy
t=$(date +%s)
expect=triton,cpu
export MHPO_EXPECT_BACKENDS=${MHPO_EXPECT_BACKENDS:-$expect}
export TORCHINDUCTOR_CACHE_DIR=$tmp/inductor-cache  # nothing compiled by another tree or torch answers
"$PY" - "$tmp" "$MHPO_BUILD_CUDA" <<'EOF'
import os
import sys

import pytest

tmp, want_cuda = os.path.realpath(sys.argv[1]), sys.argv[2] == "1"
args = ["-q", "-p", "no:cacheprovider", "-rfEs", "--durations=15",
        "tests/test_native.py", "tests/test_api.py", "tests/test_backends.py",
        "tests/test_policy.py::test_compile_fullgraph_sequence_level_packed",
        # the finishing step's per-token inputs / outputs and CISPO on every backend (Triton 3.6's interpreter too)
        "tests/test_corrections.py",
        # thinner: test_backends' grid at V = 32781 in fp32 only (the interpreter's slowest cases), and
        # not the 2-minute N*V > 2^31 native test (64-bit offsets do not depend on the torch version)
        "-k", "not (test_backends.py and test_grid and V32781 and (bf16 or fp16)) "
              "and not test_more_than_2_31_elements"]
rc = pytest.main(args)

# Everything of the package the tests imported must come from this copy.
mods = {name: getattr(m, "__file__", None) for name, m in list(sys.modules.items())
        if name.split(".")[0] in ("mhpo_kernels", "triton_kernels")}
outside = {n: f for n, f in mods.items() if f and not os.path.realpath(f).startswith(tmp + os.sep)}
need = ["mhpo_kernels", "mhpo_kernels._C_cpu", "mhpo_kernels.triton_kernels"] + (["mhpo_kernels._C_cuda"] if want_cuda else [])
missing = [n for n in need if not mods.get(n)]
top = sorted(n for n in mods if n.split(".")[0] == "triton_kernels")  # triton-lang's name, never ours
print(f"oldest-torch: the tests imported {len(mods)} package modules, e.g. {mods.get('mhpo_kernels._C_cpu')}")
if outside or missing or top:
    print(f"oldest-torch: FAILED: imported from outside {tmp}: {outside}; not imported: {missing}; "
          f"imported as a top-level triton_kernels: {top}")
    rc = rc or 1
sys.exit(rc)
EOF
say "passed: venv $venv_time, build $build_time, tests $(since "$t"), total $(since "$start")"
