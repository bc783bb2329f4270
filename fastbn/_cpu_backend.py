"""CPU backend: NumPy arrays, Cython/OpenMP kernels from ``fastbn._cpu``.

Each function receives validated, non-empty inputs (see ``fastbn.functional``),
picks the kernel for the input's memory layout and makes one kernel call; the
per-channel arithmetic (statistics, running-stat update, coefficients) happens
inside the kernel, in float64.
"""
import numpy as np

from . import _cpu
from ._layout import plan as _plan
from ._threads import threads_for

xp = np


def _l3_bytes(path="/sys/devices/system/cpu/cpu0/cache/index3/size"):
    """The L3 size Linux reports (e.g. "32768K"); 0 when unknown (kernels keep 32 MiB)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        with open(path) as f:
            text = f.read().strip()
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError, IndexError):
        return 0


_cpu.set_l3_bytes(_l3_bytes())


def _by_dtype(fused):
    """A fused Cython kernel's float and double versions by NumPy dtype: calling the
    version directly skips the fused function's dispatch on the arguments' types."""
    return {np.dtype(np.float32): fused["float"], np.dtype(np.float64): fused["double"]}


def _kernels(outer, inner):
    """(layout, dtype) -> kernel."""
    return {(kind, dtype): fn for kind, fused in (("outer", outer), ("inner", inner))
            for dtype, fn in _by_dtype(fused).items()}


_TRAIN = _kernels(_cpu.forward_train_outer, _cpu.forward_train_inner)
_EVAL = _kernels(_cpu.forward_eval_outer, _cpu.forward_eval_inner)
_AFFINE = _kernels(_cpu.affine_outer, _cpu.affine_inner)
_BACKWARD = _kernels(_cpu.backward_outer, _cpu.backward_inner)


def _contig(a):
    """Per-channel arrays may be strided views; the kernels take contiguous ones."""
    return a if a is None or a.flags.c_contiguous else np.ascontiguousarray(a)


def forward_train(x, weight, bias, running_mean, running_var, momentum, eps, out=None):
    """Normalize with batch statistics; update running stats when given.

    Returns ``(y, save_mean, save_invstd)`` with the statistics in ``x.dtype``.
    ``y`` is ``out`` when ``out``'s memory layout suits the kernel (see
    ``Plan.output``); ``out`` must not overlap the inputs.
    """
    p = _plan(np, x)
    y, y_view = p.output(np, x.dtype, out)
    save_mean = np.empty(p.shape[1], x.dtype)
    save_invstd = np.empty(p.shape[1], x.dtype)
    # strided running stats are updated through contiguous copies, written back after
    rm, rv = _contig(running_mean), _contig(running_var)
    _TRAIN[p.kind, x.dtype](p.view, y_view, _contig(weight), _contig(bias), rm, rv,
                            save_mean, save_invstd, momentum, eps, threads_for(x.size))
    for staged, target in ((rm, running_mean), (rv, running_var)):
        if staged is not target:
            target[...] = staged
    return y, save_mean, save_invstd


def forward_eval(x, weight, bias, running_mean, running_var, eps, out=None):
    """Normalize with the running statistics: one read and one write of ``x``.

    The kernel computes ``(x - running_mean) * scale + bias`` with
    ``scale = weight / sqrt(running_var + eps)`` formed in float64: subtracting
    the mean before scaling keeps full precision when ``|running_mean|`` dwarfs
    the spread of ``x``, for the price of one subtraction per value (the
    one-FMA form ``x * scale + shift`` loses ``|mean| / std`` ulps).
    """
    p = _plan(np, x)
    y, y_view = p.output(np, x.dtype, out)
    _EVAL[p.kind, x.dtype](p.view, y_view, _contig(weight), _contig(bias),
                           _contig(running_mean), _contig(running_var), eps,
                           threads_for(x.size))
    return y


def backward(gy, x, weight, mean, invstd, training, out=None, param_grads=True):
    """Gradients of batch norm: ``(grad_input, grad_weight, grad_bias)``.

    ``mean`` / ``invstd`` are the saved batch statistics (training) or the
    running mean and ``1/sqrt(running_var + eps)`` (eval). In training the
    batch mean is refined in float64 from ``x`` in the same pass (``mean``
    only serves as the shift), so a float32 ``save_mean`` loses no accuracy at
    large offsets.
    """
    p = _plan(np, x)
    dtype = x.dtype
    n_chan = p.shape[1]
    gx, gx_view = p.output(np, dtype, out)
    gw = gb = None
    if param_grads:
        gw = np.empty(n_chan, dtype)
        gb = np.empty(n_chan, dtype)
    _BACKWARD[p.kind, dtype](p.conform(np, gy), p.view, gx_view, _contig(weight),
                             np.ascontiguousarray(mean, dtype),
                             np.ascontiguousarray(invstd, np.float64), training, gw, gb,
                             threads_for(x.size))
    return gx, gw, gb


# -- building blocks for callers that combine statistics across processes -------------
# (SyncBatchNorm): the fused functions above are these steps in one kernel call.

_MOMENTS = _kernels(_cpu.moments_outer, _cpu.moments_inner)
_GRAD_SUMS = _kernels(_cpu.grad_sums_outer, _cpu.grad_sums_inner)
_GRAD_INPUT = _kernels(_cpu.grad_input_outer, _cpu.grad_input_inner)


def moments(x):
    """Per-channel float64 ``(mean, m2, count)`` of ``x``; m2 = sum of squared deviations."""
    p = _plan(np, x)
    n_chan = p.shape[1]
    mean = np.zeros(n_chan)
    m2 = np.zeros(n_chan)
    if x.size:      # not p.count: C = 0 has values per channel but no work
        _MOMENTS[p.kind, x.dtype](p.view, mean, m2, threads_for(x.size))
    return mean, m2, p.count


def normalize(x, mean, invstd, weight, bias):
    """``(x - mean) * invstd * weight + bias`` from float64 per-channel ``mean``/``invstd``."""
    p = _plan(np, x)
    y, y_view = p.empty_output(np, x.dtype)
    if x.size:      # not p.count: C = 0 has values per channel but no work
        # the coefficients of the fused kernels' (x - hi) * scale + shift, with the
        # same float64 operations, so both give the same bits
        scale = invstd if weight is None else invstd * weight
        near = np.abs(mean * scale) <= _cpu.FMA_SAFE_LIMIT     # see _set_coefs in _cpu.pyx
        hi = np.where(near, 0.0, mean).astype(x.dtype)
        lo = np.where(near, mean, mean - hi)             # what x - hi leaves to the shift
        shift = 0.0 - lo * scale if bias is None else bias - lo * scale
        _AFFINE[p.kind, x.dtype](p.view, y_view, hi, scale.astype(x.dtype),
                                 shift.astype(x.dtype), threads_for(x.size))
    return y


def grad_sums(gy, x, center):
    """float64 ``(sum dy, sum dy * (x - center), sum (x - center))`` per channel."""
    p = _plan(np, x)
    out = np.zeros((3, p.shape[1]))
    if x.size:      # not p.count: C = 0 has values per channel but no work
        _GRAD_SUMS[p.kind, x.dtype](p.conform(np, gy), p.view,
                                    np.ascontiguousarray(center, np.float64), out,
                                    threads_for(x.size))
    return out[0], out[1], out[2]


def grad_input(gy, x, weight, mean, invstd, sum_dy, sum_dyx, count):
    """Training grad_input from float64 batch ``mean``/``invstd`` and the sums around ``mean``.

    ``count`` and the sums may cover more values than ``x`` (all processes of a
    synchronized batch norm).
    """
    p = _plan(np, x)
    gx, gx_view = p.empty_output(np, x.dtype)
    if x.size:      # not p.count: C = 0 has values per channel but no work
        # dy * k - ((x - hi) * ak + mk), as in the fused kernels (_finish_backward)
        slope = sum_dyx * invstd * invstd / count
        near = (slope == 0) | (np.abs(mean) * invstd <= _cpu.FMA_SAFE_LIMIT)
        hi = np.where(near, 0.0, mean).astype(x.dtype)
        scale = invstd if weight is None else invstd * weight
        coef = np.empty((4, p.shape[1]), x.dtype)
        coef[0] = hi
        coef[1] = slope * scale
        coef[2] = (sum_dy / count - (mean - hi) * slope) * scale
        coef[3] = scale
        _GRAD_INPUT[p.kind, x.dtype](p.conform(np, gy), p.view, gx_view, coef,
                                     threads_for(x.size))
    return gx
