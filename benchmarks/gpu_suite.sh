#!/usr/bin/env bash
# The whole GPU session in one go: install refmtp (no package registry needed), run every test
# under the gpu marker, run the GPU training benchmark, and copy the results into $OUT.
#
#     bash benchmarks/gpu_suite.sh              # from anywhere; works in the repository root
#     OUT=/some/dir bash benchmarks/gpu_suite.sh
#     PYTHON=/path/to/python GPU_BENCH_ARGS="--quick" bash benchmarks/gpu_suite.sh
#     bash benchmarks/gpu_suite.sh test         # install + tests only ("bench": install + benchmark)
#
# Split it (test, then bench) when one command may run at most ~10 minutes; PYTEST_ARGS adds
# pytest options (e.g. PYTEST_ARGS="-x" or a file list).
#
# The GPU machine has CuPy, Numba, NumPy, SciPy, click, pytest and safetensors but no package
# registry, so nothing is downloaded: array-api-compat (refmtp's only other dependency) must be
# carried in as a wheel under wheels/ (e.g. copy /opt/pypi/files/array_api_compat-*.whl or run
# `pip download --no-deps array-api-compat -d wheels/` on a machine with a registry). Every wheel
# in wheels/ is installed with --no-deps --no-build-isolation, then refmtp itself in editable mode.
# If the editable install cannot be built there (no or an old setuptools), a sitecustomize.py on
# PYTHONPATH maps the installed layout (refmtp.backends -> backends/, ...) onto the checkout.
#
# Writes, under $OUT when it is set (else under benchmarks/results/gpu_suite/):
#   gpu_env.txt          nvidia-smi, python/cupy versions, refmtp info
#   gpu_tests.xml        JUnit XML of `pytest -m gpu`
#   gpu_tests.log        the pytest output (with the summary of skips and failures)
#   gpu_train.log        the benchmark output
#   gpu_train.json       benchmarks/results/gpu_train.json
#   gpu_suite_status.txt one line per stage with its exit code
# Exit status: 0 when every stage passed, else the first failing stage's code.
set -u
WHAT=${1:-all}
case "$WHAT" in all|test|bench) ;; *) echo "usage: gpu_suite.sh [all|test|bench]" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
PY=${PYTHON:-$(command -v python || command -v python3)}
DEST=${OUT:-$ROOT/benchmarks/results/gpu_suite}
mkdir -p "$DEST"
STATUS="$DEST/gpu_suite_status.txt"
echo "# gpu_suite.sh $WHAT $(date -u +%Y-%m-%dT%H:%M:%SZ)" >> "$STATUS"
FIRST_FAIL=0

stage() {  # stage NAME CODE: record a stage's exit code
    echo "$1 $2" | tee -a "$STATUS"
    if [ "$2" -ne 0 ] && [ "$FIRST_FAIL" -eq 0 ]; then FIRST_FAIL=$2; fi
}

# 1. install ---------------------------------------------------------------------------------
shopt -s nullglob
WHEELS=(wheels/*.whl)
if [ ${#WHEELS[@]} -gt 0 ]; then
    "$PY" -m pip install --no-deps --no-build-isolation "${WHEELS[@]}"
    stage install_wheels $?
else
    echo "no wheels/*.whl: array-api-compat must already be installed"
    "$PY" -c "import array_api_compat" 2>/dev/null
    stage array_api_compat_present $?
fi
if "$PY" -m pip install --no-deps --no-build-isolation -e . ; then
    stage install_refmtp 0
else
    echo "editable install failed: mapping refmtp onto this checkout with a sitecustomize finder"
    SHIM=$(mktemp -d)
    cat > "$SHIM/sitecustomize.py" <<EOF
# Written by benchmarks/gpu_suite.sh: the installed layout of refmtp (backends/ is refmtp.backends,
# cli/ refmtp.cli, golden/ refmtp.golden) without pip, as setuptools' editable finder does.
import sys
from importlib.machinery import PathFinder

_ROOT = "$ROOT"
_TOP = {"refmtp", "refmtp.backends", "refmtp.cli", "refmtp.golden"}


class _RefmtpFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname in _TOP:  # the last name's directory sits at the top of the checkout
            return PathFinder.find_spec(fullname, [_ROOT])
        return None


sys.meta_path.insert(0, _RefmtpFinder)
EOF
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -c "import refmtp.backends, refmtp.cli, refmtp.golden, refmtp.model.ops.rope"
    stage install_refmtp_shim $?
fi

# 2. environment -----------------------------------------------------------------------------
{
    date -u
    nvidia-smi || echo "nvidia-smi unavailable"
    "$PY" -c "import sys, numpy, cupy; print(sys.version); print('numpy', numpy.__version__); print('cupy', cupy.__version__); print(cupy.cuda.runtime.getDeviceProperties(0)['name'])"
    "$PY" -c "from refmtp.backends import available_backends; print(available_backends())"
    "$PY" -c "from refmtp.cli.main import main; main(['info'])" 2>&1 || true
} > "$DEST/gpu_env.txt" 2>&1
"$PY" -c "from refmtp.backends import get_backend; get_backend('cupy')"
stage cupy_backend $?

# 3. every test under the gpu marker (the cupy half of the backend fixture, the cupy kernel
#    parity tests and the numpy <-> cupy parity tests)
if [ "$WHAT" != bench ]; then
    # shellcheck disable=SC2086  # PYTEST_ARGS is a list of options
    "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$DEST/gpu_tests.xml" -rfEs \
        --durations=25 ${PYTEST_ARGS:-} 2>&1 | tee "$DEST/gpu_tests.log"
    stage pytest_gpu "${PIPESTATUS[0]}"
fi

# 4. the GPU training benchmark ---------------------------------------------------------------
if [ "$WHAT" != test ]; then
    # shellcheck disable=SC2086  # GPU_BENCH_ARGS is a list of options
    "$PY" benchmarks/gpu_train.py ${GPU_BENCH_ARGS:-} 2>&1 | tee "$DEST/gpu_train.log"
    stage gpu_train "${PIPESTATUS[0]}"
    if [ -f benchmarks/results/gpu_train.json ]; then
        cp benchmarks/results/gpu_train.json "$DEST/gpu_train.json"
    fi
fi

echo "results in $DEST"
exit "$FIRST_FAIL"
