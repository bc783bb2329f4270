"""Pick the backend module for an array: NumPy -> CPU kernels, CuPy -> CUDA kernels.

A backend module provides ``xp`` and the functions ``forward_train``,
``forward_eval`` and ``backward`` with the signatures of ``fastbn._cpu_backend``.
"""
import numpy as np

from . import _cpu_backend
from ._array import is_cupy_array


def backend_for(x):
    if type(x) is np.ndarray:
        return _cpu_backend
    if is_cupy_array(x):
        from . import _gpu    # imports CuPy: only when a CuPy array shows up

        return _gpu
    return _cpu_backend
