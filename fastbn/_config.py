"""Build and runtime facts for bug reports: ``fastbn.show_config()``."""
import platform
import sys

import numpy as np

from . import _cpu
from ._memory import get_output_cache
from ._threads import get_num_threads


def _cuda_status():
    """(usable, text) without importing CuPy unless it is installed."""
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        return False, "no (CuPy not installed)"
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # any CUDA driver/runtime failure means "not usable"
        return False, f"no ({type(exc).__name__}: {exc})"
    if count < 1:
        return False, "no (no CUDA device)"
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    return True, f"yes ({count} device(s), cuda:0 is {name}; CuPy {cupy.__version__})"


def config():
    """The facts ``show_config`` prints, as a dict."""
    from . import __version__

    usable, text = _cuda_status()
    return {
        "fastbn": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": np.__version__,
        "openmp": bool(_cpu.HAVE_OPENMP),
        "threads": get_num_threads(),
        "output_cache": get_output_cache(),
        "cuda_usable": usable,
        "cuda": text,
    }


def _mib(nbytes):
    return f"{nbytes / (1 << 20):g} MiB"


def show_config():
    """Print the fastbn version, OpenMP, thread count, output cache, NumPy version and
    CUDA availability."""
    c = config()
    print(f"fastbn      {c['fastbn']}")
    print(f"python      {c['python']} ({c['platform']})")
    print(f"numpy       {c['numpy']}")
    print(f"openmp      {'yes' if c['openmp'] else 'no (serial kernels)'}")
    print(f"threads     {c['threads']}")
    limit, kept, blocks = c["output_cache"]
    print(f"out cache   {_mib(limit)} (kept: {_mib(kept)} in {blocks} block(s))")
    print(f"cuda        {c['cuda']}")
