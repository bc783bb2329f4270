#!/usr/bin/env bash
# GPU check for a lent GPU machine (CuPy and PyTorch preinstalled, no network).
#
#   bash benchmarks/gpu_check.sh            # results in $OUT (default ./gpu_out)
#
# 1. builds fastbn's CPU extension in place if it is not importable (Cython, or
#    a plain C compile of fastbn/_cpu.c when Cython is missing),
# 2. runs tests/test_gpu_compile.py and tests/test_gpu.py (FASTBN_REQUIRE_GPU=1: no
#    silent skip when CUDA is unusable),
# 3. runs `python -m fastbn bench --device cuda` (GPU times, GB/s, ratio to
#    PyTorch CUDA, float64 checks),
# 4. runs benchmarks/gpu_profile.py (per-kernel times of fastbn and PyTorch, host
#    time per call, cProfile of small calls; informative, not part of the status).
# Writes 8 files (the device tool returns at most 8): env.txt, build.log,
# gpu_tests.txt, gpu_bench.txt, gpu_bench.json, profile.txt, kernels.json,
# summary.txt. Exit status: 0 when the tests pass and every benchmark row passes
# its float64 check. Stays under 7 minutes (timeouts below).
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
TEST_TIMEOUT="${TEST_TIMEOUT:-170}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-150}"
PROFILE_TIMEOUT="${PROFILE_TIMEOUT:-90}"
START=$(date +%s)

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }

# -- environment ------------------------------------------------------------------
{
    echo "date: $(date -u)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$PY" - <<'EOF' 2>&1
import sys, platform
print("python", sys.version.split()[0], platform.platform())
for mod in ("numpy", "cupy", "torch", "Cython", "pytest"):
    try:
        m = __import__(mod)
        print(mod, m.__version__)
    except Exception as exc:
        print(mod, "MISSING", type(exc).__name__, exc)
try:
    import cupy
    from cupy.cuda import nvrtc
    print("cuda devices", cupy.cuda.runtime.getDeviceCount(), "nvrtc", nvrtc.getVersion(),
          "runtime", cupy.cuda.runtime.runtimeGetVersion(),
          "driver", cupy.cuda.runtime.driverGetVersion())
except Exception as exc:
    print("cupy/cuda problem:", type(exc).__name__, exc)
try:
    import torch
    print("torch cuda", torch.cuda.is_available(), torch.version.cuda)
except Exception as exc:
    print("torch problem:", type(exc).__name__, exc)
EOF
} > "$OUT/env.txt"
cat "$OUT/env.txt"

# -- build fastbn in place when needed ----------------------------------------------
: > "$OUT/build.log"
if "$PY" -c "import fastbn._cpu" >> "$OUT/build.log" 2>&1; then
    say "fastbn CPU extension already importable"
elif "$PY" -c "import Cython" >> "$OUT/build.log" 2>&1; then
    say "building fastbn in place with Cython (python setup.py build_ext --inplace)"
    "$PY" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 \
        || { say "FAILED: build (see $OUT/build.log)"; exit 2; }
elif [ -f fastbn/_cpu.c ]; then
    say "Cython is not installed: compiling the generated fastbn/_cpu.c directly"
    "$PY" - >> "$OUT/build.log" 2>&1 <<'EOF' \
        || { say "FAILED: direct C build (see $OUT/build.log)"; exit 2; }
import subprocess, sysconfig, numpy
suffix = sysconfig.get_config_var("EXT_SUFFIX")
cmd = ["cc", "-shared", "-fPIC", "-O3", "-fopenmp", "-DNPY_NO_DEPRECATED_API=NPY_1_7_API_VERSION",
       "-I" + sysconfig.get_paths()["include"], "-I" + numpy.get_include(),
       "fastbn/_cpu.c", "-o", "fastbn/_cpu" + suffix]
print(" ".join(cmd))
subprocess.check_call(cmd)
EOF
else
    say "FAILED: fastbn's CPU extension is not built, Cython is not installed and there is"
    say "no network to install it. Either carry the built fastbn/_cpu*.so (or the generated"
    say "fastbn/_cpu.c) to this machine, or preinstall Cython>=3."
    exit 2
fi
"$PY" -c "import fastbn; fastbn.show_config()" 2>&1 | tee -a "$OUT/env.txt"

# -- tests ------------------------------------------------------------------------------
say "running the GPU tests (timeout ${TEST_TIMEOUT}s)"
# CUDA_CACHE_DISABLE: a cached NVRTC compilation logs no ptxas statistics, which
# test_gpu_compile.py reads (the test sets it too; this covers an earlier load).
CUDA_CACHE_DISABLE=1 FASTBN_REQUIRE_GPU=1 timeout "$TEST_TIMEOUT" \
    "$PY" -m pytest tests/test_gpu_compile.py tests/test_gpu.py -q -rs -p no:cacheprovider \
    2>&1 | tee "$OUT/gpu_tests.txt"
TEST_RC=${PIPESTATUS[0]}
say "tests: exit $TEST_RC ($(tail -n 1 "$OUT/gpu_tests.txt"))"

# -- benchmark -------------------------------------------------------------------------
say "running the GPU benchmark (timeout ${BENCH_TIMEOUT}s)"
timeout "$BENCH_TIMEOUT" "$PY" -m fastbn bench --device cuda --json "$OUT/gpu_bench.json" 2>&1 \
    | tee "$OUT/gpu_bench.txt"
BENCH_RC=${PIPESTATUS[0]}
if [ "$BENCH_RC" -eq 0 ] && grep -q "WRONG" "$OUT/gpu_bench.txt"; then
    BENCH_RC=1
fi
say "benchmark: exit $BENCH_RC"

say "running the GPU profile (timeout ${PROFILE_TIMEOUT}s)"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout "$PROFILE_TIMEOUT" \
    "$PY" benchmarks/gpu_profile.py --out "$OUT" > "$OUT/profile.log" 2>&1
PROFILE_RC=$?
[ -f "$OUT/profile.txt" ] || mv "$OUT/profile.log" "$OUT/profile.txt"
rm -f "$OUT/profile.log"
say "profile: exit $PROFILE_RC"

say "done in $(( $(date +%s) - START ))s: tests rc=$TEST_RC, bench rc=$BENCH_RC,"\
    "profile rc=$PROFILE_RC; files in $OUT"
[ "$TEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
