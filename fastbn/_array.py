"""Array-namespace helpers: tell NumPy from CuPy without importing CuPy."""
import numpy as np


def is_cupy_array(x):
    """True when ``x`` is a ``cupy.ndarray`` (checked by type name, no import)."""
    cls = type(x)
    if cls is np.ndarray:
        return False
    return cls.__module__.split(".", 1)[0] == "cupy" and cls.__name__ == "ndarray"


def is_numpy_array(x):
    return isinstance(x, np.ndarray)


def is_array(x):
    return is_numpy_array(x) or is_cupy_array(x)


def device_kind(x):
    """'cuda' for CuPy arrays, 'cpu' for NumPy arrays."""
    return "cuda" if is_cupy_array(x) else "cpu"


def to_numpy(x):
    """Host copy of a NumPy or CuPy array (NumPy arrays pass through)."""
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)
