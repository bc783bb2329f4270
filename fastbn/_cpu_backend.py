"""CPU backend: NumPy arrays, Cython/OpenMP kernels from ``fastbn._cpu``.

Each function receives validated, non-empty inputs (see ``fastbn.functional``)
and picks the kernel for the input's memory layout.
"""
import numpy as np

from . import _cpu
from ._layout import plan as _plan
from ._stats import affine_coefficients, invstd_from_var, split_hi_lo, update_running_stats
from ._threads import get_num_threads

xp = np


def _kernels(kind):
    if kind == "outer":
        return _cpu.stats_outer, _cpu.affine_outer, _cpu.grad_sums_outer, _cpu.grad_input_outer
    return _cpu.stats_inner, _cpu.affine_inner, _cpu.grad_sums_inner, _cpu.grad_input_inner


def batch_moments(x):
    """Per-channel float64 (mean, M2, count) of ``x`` (ndim >= 2, N * S >= 1)."""
    p = _plan(np, x)
    stats, _, _, _ = _kernels(p.kind)
    n_chan = p.shape[1]
    mean = np.empty(n_chan, np.float64)
    m2 = np.empty(n_chan, np.float64)
    stats(p.view, mean, m2, get_num_threads())
    return mean, m2, p.count


def normalize(x, mean64, invstd64, weight, bias):
    """``(x - mean) * invstd * weight + bias``; output keeps channels-last memory."""
    p = _plan(np, x)
    _, affine, _, _ = _kernels(p.kind)
    coefs = affine_coefficients(np, mean64, invstd64, weight, bias, x.dtype)
    out, out_view = p.empty_output(np, x.dtype)
    affine(p.view, out_view, *coefs, get_num_threads())
    return out


def forward_train(x, weight, bias, running_mean, running_var, momentum, eps):
    """Normalize with batch statistics; update running stats when given.

    Returns ``(y, save_mean, save_invstd)`` with the statistics in ``x.dtype``.
    """
    mean, m2, count = batch_moments(x)
    invstd = invstd_from_var(np, m2 / count, eps)
    y = normalize(x, mean, invstd, weight, bias)
    update_running_stats(np, running_mean, running_var, mean, m2, count, momentum)
    return y, mean.astype(x.dtype), invstd.astype(x.dtype)


def forward_eval(x, weight, bias, running_mean, running_var, eps):
    """Normalize with the running statistics."""
    invstd = invstd_from_var(np, running_var.astype(np.float64), eps)
    return normalize(x, running_mean.astype(np.float64), invstd, weight, bias)


def backward(gy, x, weight, mean, invstd, training):
    """Gradients of batch norm: ``(grad_input, grad_weight, grad_bias)``.

    ``mean`` / ``invstd`` are the saved batch statistics (training) or the
    running mean and ``1/sqrt(running_var + eps)`` (eval). In training the
    batch mean is refined in float64 from ``x`` in the same pass (``mean``
    only serves as the shift), so a float32 ``save_mean`` loses no accuracy at
    large offsets.
    """
    p = _plan(np, x)
    _, affine, grad_sums, grad_input = _kernels(p.kind)
    dtype = x.dtype
    n_chan = p.shape[1]
    nt = get_num_threads()
    dy = p.conform(np, gy)
    center = mean.astype(np.float64)
    invstd64 = invstd.astype(np.float64)
    sums = np.empty((3, n_chan), np.float64)
    grad_sums(dy, p.view, center, sums, nt)
    sum_dy, sum_dyx, sum_x = sums
    count = p.count
    if training:
        offset = sum_x / count                 # true mean - center
        center = center + offset
        sum_dyx = sum_dyx - offset * sum_dy    # sum(dy * (x - true mean))
    w64 = np.ones(n_chan) if weight is None else weight.astype(np.float64)
    k = invstd64 * w64
    gx, gx_view = p.empty_output(np, dtype)
    if training:
        hi, lo = split_hi_lo(np, center, dtype)
        mdy = sum_dy / count
        a = sum_dyx * invstd64 * invstd64 / count
        grad_input(dy, p.view, gx_view, hi, lo, k.astype(dtype), mdy.astype(dtype),
                   a.astype(dtype), nt)
    else:
        zeros = np.zeros(n_chan, dtype)
        affine(dy, gx_view, zeros, zeros, k.astype(dtype), zeros, nt)
    if weight is None:
        return gx, None, None
    return gx, (sum_dyx * invstd64).astype(dtype), sum_dy.astype(dtype)
