"""Thread count used by the CPU kernels."""
import os

from . import _cpu
from ._validation import check_num_threads

_num_threads = None
_default = None

# Below this many values per call, waking a second thread costs more than it saves.
MIN_VALUES_PER_THREAD = 1 << 15


def _default_threads():
    global _default
    if _default is None:
        env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
        if env.isdigit() and int(env) > 0:
            _default = int(env)
        else:
            _default = max(1, int(_cpu.omp_max_threads()))
    return _default


def set_num_threads(n):
    """Set the number of OpenMP threads the CPU kernels use.

    Parameters
    ----------
    n : int
        A positive thread count. Results do not depend on it: only speed does.
        Without OpenMP the kernels run serially whatever ``n`` is.
    """
    global _num_threads
    _num_threads = check_num_threads(n)


def get_num_threads():
    """Number of threads the CPU kernels will use.

    ``set_num_threads`` wins; otherwise ``OMP_NUM_THREADS``; otherwise OpenMP's
    default (the number of cores). Always 1 in a build without OpenMP.
    """
    if not _cpu.HAVE_OPENMP:
        return 1
    return _num_threads if _num_threads is not None else _default_threads()


def threads_for(size):
    """Threads for a call over ``size`` values: fewer for small inputs.

    Results never depend on it (see ``fastbn/_cpu.pyx``), only the speed does.
    """
    n = size // MIN_VALUES_PER_THREAD
    if n <= 1:
        return 1     # the common small call, without the lookups below
    return min(get_num_threads(), n)
