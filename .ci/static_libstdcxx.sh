#!/usr/bin/env bash
# CI step: a toolchain that links libstdc++ statically must still give an extension that
# uses torch's shared C++ runtime. Such a toolchain (a GCC with only libstdc++.a, or
# -static-libstdc++) once made every TORCH_CHECK message with a number segfault on the GPU
# machine; here the same mix-up makes the numbers vanish. setup.py names torch's
# libstdc++.so.6 on the link line; this step checks that it works.
#
# In a temporary copy of the tree: build the CPU extension with
# LDFLAGS="-Wl,-Bsymbolic-functions -static-libstdc++", then run, against that build (not the
# editable install), the test that it NEEDs libstdc++.so.6 and the bad-argument test that
# matches every message whole. Run with the CI venv active (torch installed). ~1-2 min on 2 cores.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
start=$(date +%s)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/mhpo-static-libstdcxx.XXXXXX")
if [ "${MHPO_KEEP_TMP:-0}" = 1 ]; then echo "keeping $tmp"; else trap 'rm -rf "$tmp"' EXIT; fi

# What the build and test_native need: top-level files (setup.py, pyproject.toml, README.md...)
# and the packages, without build outputs or the editable install's extensions.
cd "$root"
find . -maxdepth 1 -type f ! -name .git -print0 \
    | tar -cf - --exclude='*.so' --exclude=__pycache__ --exclude='*.egg-info' --null -T - \
        csrc mhpo_kernels triton_kernels tests \
    | tar -xf - -C "$tmp"
cd "$tmp"

export LDFLAGS="-Wl,-Bsymbolic-functions -static-libstdc++"
echo "static-libstdc++: building the CPU extension in $tmp with LDFLAGS=\"$LDFLAGS\""
if ! MHPO_BUILD_NATIVE=1 MHPO_BUILD_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} python setup.py build_ext --inplace -q \
        >build.log 2>&1; then
    cat build.log
    echo "static-libstdc++: FAILED to build"
    exit 1
fi
link=$(grep -E -- '-shared.* -o [^ ]*_C_cpu' build.log | tail -1)
echo "static-libstdc++: link line: $link"
case "$link" in
    *-static-libstdc++*) ;;
    *) echo "static-libstdc++: FAILED: the link line does not carry LDFLAGS, so this step tests nothing"; exit 1 ;;
esac
echo "static-libstdc++: built in $(( $(date +%s) - start ))s"

# The tests, imported from this copy (cwd first on sys.path, ahead of the editable install's finder);
# afterwards the extension the tests used must be this copy's.
python - "$tmp" <<'EOF'
import os
import sys

import pytest

tmp = sys.argv[1]
tests = ["tests/test_native.py::test_extensions_share_torchs_libstdcxx", "tests/test_native.py::test_bad_arguments"]


class Outcomes:
    def __init__(self):
        self.passed = []

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.passed:
            self.passed.append(report.nodeid)


seen = Outcomes()
rc = pytest.main(["-q", "-p", "no:cacheprovider", "-rs", *tests], plugins=[seen])
so = getattr(sys.modules.get("mhpo_kernels._C_cpu"), "__file__", None)
print(f"static-libstdc++: the tests used {so}")
ok = rc == 0 and sorted(seen.passed) == sorted(tests)
if so is None or not os.path.realpath(so).startswith(os.path.realpath(tmp) + os.sep):
    print("static-libstdc++: FAILED: the tests did not run against the static-libstdc++ build")
    ok = False
elif not ok:
    print(f"static-libstdc++: FAILED (pytest rc {rc}, passed {seen.passed} of {tests})")
sys.exit(0 if ok else 1)
EOF
echo "static-libstdc++: passed in $(( $(date +%s) - start ))s"
