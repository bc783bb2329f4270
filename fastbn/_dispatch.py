"""Pick the backend module for an array: NumPy -> CPU kernels, CuPy -> CUDA kernels.

A backend module provides ``xp`` and the functions ``forward_train``,
``forward_eval`` and ``backward`` with the signatures of ``fastbn._cpu_backend``.
"""
from ._array import is_cupy_array


def backend_for(x):
    if is_cupy_array(x):
        from . import _gpu

        return _gpu
    from . import _cpu_backend

    return _cpu_backend
