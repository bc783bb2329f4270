"""All argument checks and their error texts, in one place.

Every public entry point calls these before it touches any state, so a call that
raises leaves parameters, running statistics and ``num_batches_tracked`` as they
were.
"""
import math
import numbers

import numpy as np

from ._array import device_kind, is_array, is_cupy_array

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_INF = float("inf")


def _type_name(x):
    cls = type(x)
    mod = cls.__module__.split(".", 1)[0]
    return f"{mod}.{cls.__name__}" if mod != "builtins" else cls.__name__


def _int_at_least(n, name, low):
    """``n`` as an int >= ``low`` (0: "non-negative", 1: "positive"); bool is refused."""
    what = "a positive int" if low == 1 else "a non-negative int"
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{name} must be {what}, got {_type_name(n)} {n!r}")
    if n < low:
        raise ValueError(f"{name} must be {what}, got {n}")
    return int(n)


def check_num_threads(n):
    return _int_at_least(n, "num_threads", 1)


def check_cache_bytes(n):
    return _int_at_least(n, "max_bytes", 0)


def check_num_features(n):
    return _int_at_least(n, "num_features", 1)


def check_eps(eps, training):
    if type(eps) is float and 0 < eps < _INF:     # the common case, checked cheaply
        return eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {_type_name(eps)} {eps!r}")
    eps = float(eps)
    if not np.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if training and eps <= 0:
        raise ValueError(f"eps must be > 0 when training (the batch variance can be 0), "
                         f"got eps={eps}")
    return eps


def check_momentum(momentum, allow_none):
    if type(momentum) is float and -_INF < momentum < _INF:
        return momentum
    if momentum is None and allow_none:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        allowed = "a real number or None" if allow_none else "a real number"
        raise TypeError(f"momentum must be {allowed}, got {_type_name(momentum)} {momentum!r}")
    momentum = float(momentum)
    if not np.isfinite(momentum):
        raise ValueError(f"momentum must be finite, got {momentum}")
    return momentum


def check_flag(value, name):
    if value is True or value is False:
        return value
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {_type_name(value)} {value!r}")
    return bool(value)


def check_dtype(dtype, name="dtype"):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}") from None
    if dt not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dt}")
    return dt


def parse_device(device):
    """Normalise 'cpu' / 'cuda' / 'cuda:N' into ('cpu', None) or ('cuda', N)."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda:0', got "
                        f"{_type_name(device)} {device!r}")
    text = device.strip().lower()
    if text == "cpu":
        return "cpu", None
    if text == "cuda":
        return "cuda", None
    if text.startswith("cuda:") and text[5:].isdigit():
        return "cuda", int(text[5:])
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def check_input(x, name="input"):
    """A NumPy/CuPy array of float32 or float64."""
    if type(x) is np.ndarray and x.dtype in SUPPORTED_DTYPES:
        return x
    if not is_array(x):
        raise TypeError(f"{name} must be a numpy.ndarray or cupy.ndarray, got {_type_name(x)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; fastbn supports float32 and float64 "
                        f"(convert with {name}.astype(numpy.float32))")
    return x


def check_module_rank(x, allowed_ndims, kind_text):
    """PyTorch's wording: 'expected 4D input (got 3D input)'."""
    if x.ndim not in allowed_ndims:
        raise ValueError(f"expected {kind_text} input (got {x.ndim}D input)")


def check_min_rank(x):
    if x.ndim < 2:
        raise ValueError(f"expected at least 2D input (got {x.ndim}D input)")


def check_num_channels(x, num_features):
    if x.shape[1] != num_features:
        raise ValueError(f"input has {x.shape[1]} channels on axis 1 (shape "
                         f"{tuple(x.shape)}) but the module expects num_features="
                         f"{num_features}")


def check_batch_size(x):
    """Training needs more than one value per channel (PyTorch's text)."""
    count = x.shape[0] * math.prod(x.shape[2:])
    if count == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {tuple(x.shape)}")


def _device_hint(want):
    if want == "cuda":
        return "convert it with cupy.asarray(...) or move the module with bn.to('cpu')"
    return "convert it with cupy.asnumpy(...) or move the module with bn.to('cuda')"


def _all_beside(reference, arrays):
    """Quick yes: every array is None or of ``reference``'s own class, on its device
    (CuPy). A False only means that the full checks must decide."""
    cls = type(reference)
    if cls is np.ndarray:
        for a in arrays:
            if a is not None and type(a) is not cls:
                return False
        return True
    if not is_cupy_array(reference):
        return False
    dev = reference.data.device_id
    for a in arrays:
        if a is not None and (type(a) is not cls or a.data.device_id != dev):
            return False
    return True


def check_same_device(reference, arrays, reference_name="input"):
    """All of ``arrays`` (name -> array or None) live where ``reference`` does."""
    if _all_beside(reference, arrays.values()):
        return   # the common case, without the per-array checks below
    want = device_kind(reference)
    for name, a in arrays.items():
        if a is None:
            continue
        if not is_array(a):
            raise TypeError(f"{name} must be a numpy.ndarray or cupy.ndarray, got "
                            f"{_type_name(a)}")
        have = device_kind(a)
        if have != want:
            raise TypeError(
                f"{name} is a {_type_name(a)} ({have}) but {reference_name} is a "
                f"{_type_name(reference)} ({want}); NumPy and CuPy arrays cannot be mixed "
                f"in one call: {_device_hint(want)}")
        if want == "cuda" and a.device.id != reference.device.id:
            raise TypeError(f"{name} is on cuda:{a.device.id} but {reference_name} is on "
                            f"cuda:{reference.device.id}")


def check_module_device(module_name, device, x):
    """The input must live where the module does; says how to fix it otherwise."""
    kind, index = device
    have = device_kind(x)
    if have != kind:
        fix = ("bn.to('cuda')" if have == "cuda" else "bn.to('cpu')")
        conv = ("cupy.asarray(x)" if kind == "cuda" else "cupy.asnumpy(x)")
        raise TypeError(
            f"{module_name} is on device '{kind}' but the input is a {_type_name(x)} "
            f"({have}); move the module with {fix} or convert the input with {conv}")
    # a module placed on "cuda" keeps its arrays on cuda:0 (see modules._cupy_for)
    if kind == "cuda" and x.device.id != (0 if index is None else index):
        raise TypeError(f"{module_name} is on cuda:{0 if index is None else index} but the "
                        f"input is on cuda:{x.device.id}; use bn.to('cuda:{x.device.id}')")


def check_channel_array(a, name, num_channels, dtype):
    """A per-channel parameter or buffer: shape (C,), same dtype as the input."""
    if a is None:
        return None
    if a.ndim != 1 or a.shape[0] != num_channels:
        raise ValueError(f"{name} must have shape ({num_channels},) to match the input's "
                         f"{num_channels} channels, got shape {tuple(a.shape)}")
    if a.dtype != dtype:
        raise TypeError(f"{name} has dtype {a.dtype} but the input has dtype {dtype}; "
                        f"parameters and buffers must share the input's dtype")
    return a


def check_channel_arrays(x, names, arrays):
    """Per-channel arrays (``arrays[i]`` named ``names[i]``, each an array or None) next
    to input ``x``: same device, shape (C,), x's dtype. Calls that pass, with arrays of
    x's own class, take two quick loops."""
    if _all_beside(x, arrays):
        shape, dtype = (x.shape[1],), x.dtype
        for a in arrays:
            if a is not None and (a.shape != shape or a.dtype is not dtype):
                break
        else:
            return
    named = dict(zip(names, arrays))
    check_same_device(x, named)
    for name, a in named.items():
        check_channel_array(a, name, x.shape[1], x.dtype)


def check_writable(a, name):
    if a is None or (type(a) is np.ndarray and a.flags.writeable):
        return
    if not is_cupy_array(a) and not a.flags.writeable:
        raise ValueError(f"{name} is read-only but must be updated in place")


def check_same_shape(a, name, ref, ref_name):
    if tuple(a.shape) != tuple(ref.shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)} but {ref_name} has shape "
                         f"{tuple(ref.shape)}; they must match")
    if a.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {a.dtype} but {ref_name} has dtype {ref.dtype}; "
                        f"they must match")


def check_out(out, x, name="out"):
    """``out`` must be a writable array like ``x``: same kind, device, shape and dtype."""
    if out is None:
        return None
    check_same_device(x, {name: out})
    if tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype:
        raise ValueError(f"{name} must have the input's shape {tuple(x.shape)} and dtype "
                         f"{x.dtype}, got shape {tuple(out.shape)} and dtype {out.dtype}")
    check_writable(out, name)
    return out
