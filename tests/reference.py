"""Slow, obviously-correct float64 batch norm, the yardstick for every fast path.

Everything is computed in float64 from the given values (float32 inputs are
promoted exactly), with the textbook formulas and no tricks.
"""
import numpy as np


def _axes(x):
    return (0,) + tuple(range(2, x.ndim))


def _bcast(v, x):
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def moments(x):
    """Per-channel mean and biased variance of x (N, C, *) in float64."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=_axes(x))
    var = ((x - _bcast(mean, x)) ** 2).mean(axis=_axes(x))
    return mean, var


def forward(x, weight, bias, mean, var, eps):
    x = np.asarray(x, np.float64)
    y = (x - _bcast(mean, x)) / np.sqrt(_bcast(var, x) + eps)
    if weight is not None:
        y = y * _bcast(np.asarray(weight, np.float64), x)
    if bias is not None:
        y = y + _bcast(np.asarray(bias, np.float64), x)
    return y


def forward_train(x, weight, bias, eps):
    """(y, mean, biased var) with batch statistics."""
    mean, var = moments(x)
    return forward(x, weight, bias, mean, var, eps), mean, var


def running_update(running, batch_value, momentum):
    return (1.0 - momentum) * np.asarray(running, np.float64) + momentum * batch_value


def backward(gy, x, weight, mean, var, eps, training):
    """(grad_input, grad_weight, grad_bias) in float64.

    ``mean``/``var`` are the batch statistics (training) or running ones (eval).
    """
    gy = np.asarray(gy, np.float64)
    x = np.asarray(x, np.float64)
    axes = _axes(x)
    count = x.size // x.shape[1]
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - _bcast(mean, x)) * _bcast(invstd, x)
    w = np.ones(x.shape[1]) if weight is None else np.asarray(weight, np.float64)
    grad_bias = gy.sum(axis=axes)
    grad_weight = (gy * xhat).sum(axis=axes)
    if training:
        gx = (gy - _bcast(grad_bias / count, x) - xhat * _bcast(grad_weight / count, x))
        gx = gx * _bcast(invstd * w, x)
    else:
        gx = gy * _bcast(invstd * w, x)
    return gx, grad_weight, grad_bias
