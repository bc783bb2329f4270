"""The CUDA source compiles with NVRTC for sm_80 and sm_90, without a GPU.

CI installs the ``gpu-check`` extra (``cupy-cuda13x``, ``nvidia-cuda-nvrtc``).
CuPy 14 loads ``libnvrtc`` from the ``nvidia-cuda-nvrtc`` wheel by itself
(through its ``cuda-pathfinder`` dependency), so nothing needs to be set up:
``cupy.cuda.nvrtc`` works on a machine without a driver or device. The module is
skipped only when CuPy is not installed.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("cupy")
from cupy.cuda import nvrtc            # noqa: E402

from fastbn import _gpu                 # noqa: E402

ARCHS = ["sm_80", "sm_90"]

# What cupy.RawModule appends to NVRTC_OPTIONS when it compiles for a device
# (cupy/cuda/compiler.py, CuPy 14): flush-to-zero, device as the default
# execution space, and -arch=sm_XX (a cubin) or -arch=compute_XX (PTX, when
# the driver is older than NVRTC).
CUPY_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")


class CompileError(RuntimeError):
    pass


def compile_source(source, arch, names=_gpu.NAME_EXPRESSIONS, extra=()):
    """Compile like cupy.RawModule; return ``(lowered names, cubin or PTX, log)``.

    Raises CompileError with NVRTC's log when the compilation fails.
    """
    prog = nvrtc.createProgram(source, "batchnorm.cu", [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        options = list(_gpu.NVRTC_OPTIONS) + list(CUPY_OPTIONS) + [f"-arch={arch}"] + list(extra)
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as exc:
            raise CompileError(f"NVRTC {arch}: {exc}\n{nvrtc.getProgramLog(prog)}") from None
        lowered = {name: nvrtc.getLoweredName(prog, name) for name in names}
        binary = nvrtc.getCUBIN(prog) if arch.startswith("sm_") else nvrtc.getPTX(prog)
        return lowered, binary, nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


@pytest.fixture(scope="module")
def compiled():
    """One compilation per architecture, with ptxas statistics, shared by the tests.

    Where a driver is installed, NVRTC serves a repeated compilation from the CUDA
    compute cache and its log then holds no ptxas statistics (seen on an H100,
    2026-11-28; NVIDIA/cuda-python#1124): CUDA_CACHE_DISABLE=1 turns that off.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUDA_CACHE_DISABLE", "1")
        source = _gpu.kernel_source()
        return {arch: compile_source(source, arch, extra=("--ptxas-options=-v",))
                for arch in ARCHS}


def test_nvrtc_is_loaded():
    assert nvrtc.getVersion() >= (12, 0)
    supported = nvrtc.getSupportedArchs()
    for arch in ARCHS:
        assert int(arch[3:]) in supported


@pytest.mark.parametrize("arch", ARCHS)
def test_every_name_expression_is_lowered_into_the_cubin(compiled, arch):
    lowered, cubin, log = compiled[arch]
    assert len(cubin) > 0
    assert set(lowered) == set(_gpu.NAME_EXPRESSIONS)
    for name, symbol in lowered.items():
        assert symbol.startswith("_Z"), (name, symbol)
        assert symbol.encode() in cubin, f"{name} ({symbol}) missing from the {arch} cubin"
    assert "warning" not in log.lower(), log


@pytest.mark.parametrize("arch", ARCHS)
def test_streaming_kernels_do_not_spill(compiled, arch):
    """__launch_bounds__ caps registers; the kernels that stream the tensor must not spill."""
    lowered, _, log = compiled[arch]
    assert "bytes spill stores" in log, f"no ptxas statistics in the NVRTC log:\n{log!r}"
    spills = dict(re.findall(r"Function properties for (\w+)\n[^\n]*?(\d+) bytes spill stores",
                             log))
    for name, symbol in lowered.items():
        if name.split("<")[0].split("::")[1] in _gpu._PER_CHANNEL + _gpu._UNTYPED:
            continue            # one thread per channel, not on the bandwidth path
        assert spills.get(symbol) == "0", f"{name}: {spills.get(symbol)} bytes spilled\n{log}"


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_ptx_has_every_entry(arch):
    lowered, ptx, _ = compile_source(_gpu.kernel_source(), arch)
    text = ptx.decode() if isinstance(ptx, bytes) else ptx
    for name, symbol in lowered.items():
        assert f".entry {symbol}(" in text, name


def test_name_expressions_cover_every_kernel():
    source = _gpu.kernel_source()
    kernels = set(re.findall(r"__global__ void (?:__launch_bounds__\([^)]*\)\s*)?(\w+)\(",
                             source))
    named = {re.match(r"fastbn::(\w+)", n).group(1) for n in _gpu.NAME_EXPRESSIONS}
    assert kernels == named
    assert len(set(_gpu.NAME_EXPRESSIONS)) == len(_gpu.NAME_EXPRESSIONS)


def test_sync_building_block_kernels(compiled):
    """SyncBatchNorm's steps: grad_sums with a double center is its own instantiation for
    float input (a double input reuses the fused one), plus two per-channel kernels."""
    names = set(_gpu.NAME_EXPRESSIONS)
    assert "fastbn::finalize_partials" in names
    assert {"fastbn::coefs_from_stats<float>", "fastbn::coefs_from_stats<double>"} <= names
    f32 = _gpu.kernel_name("grad_sums_inner", np.float32, 4, True, np.float64)
    assert f32 == "fastbn::grad_sums_inner<float, 4, true, double>" and f32 in names
    assert (_gpu.kernel_name("grad_sums_outer", np.float64, 2, False, np.float64)
            == _gpu.kernel_name("grad_sums_outer", np.float64, 2, False))
    lowered = compiled["sm_90"][0]
    assert lowered[f32] != lowered["fastbn::grad_sums_inner<float, 4, true>"]


def test_python_and_cuda_constants_agree():
    """Launch geometry in fastbn/_gpu.py assumes the block size and unroll of the source."""
    source = _gpu.kernel_source()
    for name in ("THREADS", "UNROLL"):
        found = re.search(rf"constexpr int {name} = (\d+);", source)
        assert found and int(found.group(1)) == getattr(_gpu, name), name


def test_broken_source_fails_loudly():
    """The checks above cannot pass vacuously: a syntax error is reported with its line."""
    source = _gpu.kernel_source()
    marker = "constexpr int UNROLL = 4;"
    assert marker in source
    broken = source.replace(marker, "constexpr int UNROLL = ;", 1)
    line = broken[:broken.index("UNROLL = ;")].count("\n") + 1
    with pytest.raises(CompileError, match=rf"batchnorm\.cu\({line}\): error"):
        compile_source(broken, "sm_90")


def test_unknown_name_expression_fails():
    with pytest.raises(CompileError):
        compile_source(_gpu.kernel_source(), "sm_90", names=("fastbn::no_such_kernel<float>",))


def test_type_error_in_one_instantiation_fails():
    """A template body is only checked when instantiated: the double path must be too."""
    anchor = "const double m = mean != nullptr ? static_cast<double>(mean[c]) : 0.0;"
    source = _gpu.kernel_source()
    assert source.count(anchor) == 1
    source = source.replace(anchor, anchor + '\nstatic_assert(sizeof(T) == 4, "float only");')
    names = [n for n in _gpu.NAME_EXPRESSIONS if "affine_coefs" in n]
    with pytest.raises(CompileError, match="float only"):
        compile_source(source, "sm_90", names=names)


def test_kernel_source_is_package_data():
    source = _gpu.kernel_source()
    assert "namespace fastbn" in source
    assert not re.search(r"^\s*#\s*include", source, re.M), "NVRTC has no include path"


def test_importing_fastbn_does_not_import_cupy(tmp_path):
    code = ("import sys, fastbn, fastbn.functional, fastbn.modules\n"
            "assert 'cupy' not in sys.modules, 'fastbn imported cupy'\n"
            "assert 'fastbn._gpu' not in sys.modules\n")
    # the same fastbn as this process, whatever the working directory holds
    parent = os.path.dirname(os.path.dirname(os.path.abspath(_gpu.__file__)))
    path = [parent] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)


def test_old_cupy_is_refused_at_import():
    """CuPy 13 would pass None kernel arguments as invalid pointers (cupy/cupy#9046)."""
    code = ("import cupy; cupy.__version__ = '13.3.0'\n"
            "try:\n    import fastbn._gpu\nexcept ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "needs CuPy >= 14, found 13.3.0" in out
