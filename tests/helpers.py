"""Input generators shared by the tests."""
import numpy as np

LAYOUTS = ("contiguous", "channels_last", "strided", "transposed")


def make(shape, dtype=np.float32, offset=0.0, scale=1.0, seed=0, layout="contiguous"):
    """Random input of ``shape`` (N, C, *) laid out in memory as ``layout``.

    contiguous     C order
    channels_last  NHWC memory viewed as NCHW (C contiguous)
    strided        every other element of a larger array along the last axis
    transposed     F order (a transposed C-order array)
    """
    rng = np.random.default_rng(seed)
    values = offset + scale * rng.standard_normal(shape)
    values = values.astype(dtype)
    return relayout(values, layout)


def relayout(values, layout):
    if layout == "contiguous":
        return np.ascontiguousarray(values)
    if layout == "channels_last":
        axes = (0,) + tuple(range(2, values.ndim)) + (1,)
        return np.ascontiguousarray(values.transpose(axes)).transpose(np.argsort(axes))
    if layout == "strided":
        big = np.zeros(values.shape[:-1] + (2 * values.shape[-1],), values.dtype)
        big[..., ::2] = values
        return big[..., ::2]
    if layout == "transposed":
        return np.asfortranarray(values)
    raise ValueError(layout)


def is_channels_last(a):
    axes = (0,) + tuple(range(2, a.ndim)) + (1,)
    return a.transpose(axes).flags.c_contiguous


def tol(dtype):
    """(rtol, atol) for comparing against PyTorch in ``dtype``."""
    return (1e-4, 1e-5) if np.dtype(dtype) == np.float32 else (1e-10, 1e-12)


def params(c, dtype, seed=1):
    """Random (weight, bias, running_mean, running_var) for ``c`` channels."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.5, 1.5, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    rm = rng.standard_normal(c).astype(dtype)
    rv = rng.uniform(0.5, 2.0, c).astype(dtype)
    return w, b, rm, rv


def backward_outputs(x):
    """Forward (training) and backward outputs for ``x``, with ``dy = x``."""
    import fastbn

    y, sm, si = fastbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    w = np.ones(x.shape[1], x.dtype)
    gx, gw, gb = fastbn.batch_norm_backward(x, x, w, None, None, sm, si, True, 1e-5)
    return y, sm, si, gx, gw, gb
