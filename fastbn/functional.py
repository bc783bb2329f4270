"""Functional batch normalization, mirroring ``torch.nn.functional.batch_norm``
and aten's ``native_batch_norm`` / ``native_batch_norm_backward``.

Inputs are NumPy arrays (CPU kernels) or CuPy arrays (CUDA kernels) with
channels on axis 1 and any rank >= 2. All arguments are checked before any
array is written, so a call that raises changes nothing.
"""

from . import _validation as v
from ._dispatch import backend_for
from ._stats import invstd_from_var

__all__ = ["batch_norm", "batch_norm_forward", "batch_norm_backward"]


_CHANNEL_ARRAYS = ("weight", "bias", "running_mean", "running_var")


def _check_common(x, weight, bias, running_mean, running_var, training, eps):
    v.check_input(x)
    v.check_min_rank(x)
    training = v.check_flag(training, "training")
    eps = v.check_eps(eps, training)
    v.check_channel_arrays(x, _CHANNEL_ARRAYS, (weight, bias, running_mean, running_var))
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be arrays or both be None")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    return training, eps


def _direct_out(xp, out, *inputs):
    """``out`` when the kernel may write into it directly, else None.

    Overlap with an input would let the kernel read values it already wrote (and
    breaks the kernels' no-aliasing assumption), so such calls go through a
    temporary that is copied into ``out`` at the end.
    """
    if out is None or any(a is not None and xp.may_share_memory(out, a) for a in inputs):
        return None
    return out


def _deliver(result, out):
    if out is None or result is out:
        return result
    out[...] = result
    return out


def batch_norm_forward(x, weight, bias, running_mean, running_var, training, momentum, eps,
                       *, out=None):
    """Forward batch normalization that also returns the saved statistics.

    Parameters
    ----------
    x : numpy.ndarray or cupy.ndarray
        Input of shape ``(N, C, *)``, float32 or float64.
    weight, bias : array of shape (C,) or None
        Affine parameters (``None`` means 1 and 0).
    running_mean, running_var : array of shape (C,) or None
        Running statistics. In training they are updated in place (when given)
        with the batch mean and the unbiased batch variance; in eval they are
        used to normalize and are required.
    training : bool
        Use batch statistics (True) or running statistics (False).
    momentum : float
        Weight of the new batch in the running-statistics update.
    eps : float
        Added to the variance; must be > 0 in training.
    out : array, optional
        Where to write ``y`` (same shape and dtype as ``x``, any layout; it may be
        ``x`` itself). With C-contiguous memory, or channels-last memory for a
        channels-last ``x``, that shares no memory with the inputs, the kernel
        writes into it directly: no allocation. An ``out`` that overlaps an input
        is written through a temporary.

    Returns
    -------
    y : array
        Same shape and dtype as ``x``; channels-last input gives channels-last
        output, every other input a C-contiguous one.
    save_mean, save_invstd : array of shape (C,)
        Batch mean and ``1/sqrt(var + eps)`` in training; empty arrays in eval
        and for an empty batch (as PyTorch's CPU kernel returns).
    """
    training, eps = _check_common(x, weight, bias, running_mean, running_var, training, eps)
    momentum = v.check_momentum(momentum, allow_none=False)
    v.check_out(out, x)
    if training:
        v.check_batch_size(x)
        for name, a in (("running_mean", running_mean), ("running_var", running_var)):
            v.check_writable(a, name)
    backend = backend_for(x)
    xp = backend.xp
    if x.size == 0:
        empty = xp.empty((0,), x.dtype)
        return _deliver(xp.empty(x.shape, x.dtype), out), empty, empty.copy()
    direct = _direct_out(xp, out, x, weight, bias, running_mean, running_var)
    if training:
        y, save_mean, save_invstd = backend.forward_train(
            x, weight, bias, running_mean, running_var, momentum, eps, out=direct)
        return _deliver(y, out), save_mean, save_invstd
    y = backend.forward_eval(x, weight, bias, running_mean, running_var, eps, out=direct)
    return _deliver(y, out), xp.empty(0, x.dtype), xp.empty(0, x.dtype)


def batch_norm_backward(gy, x, weight, running_mean, running_var, save_mean, save_invstd,
                        training, eps, *, out=None, param_grads=True):
    """Gradients of :func:`batch_norm_forward`.

    Parameters
    ----------
    gy : array
        Gradient of the loss w.r.t. the output, same shape and dtype as ``x``.
    x, weight : array
        The forward call's input and weight (``weight`` may be None).
    running_mean, running_var : array or None
        Used (and required) when ``training`` is False.
    save_mean, save_invstd : array of shape (C,)
        What :func:`batch_norm_forward` returned; used when ``training`` is True.
    training : bool
        Whether the forward call used batch statistics.
    eps : float
        The forward call's ``eps``.
    out : array, optional
        Where to write ``grad_input`` (as ``out`` of :func:`batch_norm_forward`;
        it may be ``gy`` itself).
    param_grads : bool, default True
        Whether to compute ``grad_weight`` and ``grad_bias`` (PyTorch's
        ``output_mask[1:]``). They do not need ``weight``: a bias-only layer
        gets its ``grad_bias`` with ``weight=None``. False skips them (and, in
        eval mode, the reduction pass they need).

    Returns
    -------
    grad_input : array
        Same shape as ``x`` (and the same memory layout as ``x``).
    grad_weight, grad_bias : array of shape (C,) or None
        ``sum(gy * xhat)`` and ``sum(gy)`` over all but axis 1; ``None`` when
        ``param_grads`` is False.
    """
    training, eps = _check_common(x, weight, None, running_mean, running_var, training, eps)
    v.check_input(gy, "grad_output")
    v.check_same_device(x, {"grad_output": gy, "save_mean": save_mean,
                            "save_invstd": save_invstd})
    v.check_same_shape(gy, "grad_output", x, "input")
    v.check_out(out, x)
    param_grads = v.check_flag(param_grads, "param_grads")
    backend = backend_for(x)
    xp = backend.xp
    n_chan = x.shape[1]
    empty = x.size == 0
    if training:
        for name, a in (("save_mean", save_mean), ("save_invstd", save_invstd)):
            if a is None:
                raise ValueError(f"{name} is required when training=True")
            if not (empty and a.shape == (0,)):
                v.check_channel_array(a, name, n_chan, x.dtype)
    if empty:
        zeros = xp.zeros(n_chan, x.dtype) if param_grads else None
        gx = _deliver(xp.empty(x.shape, x.dtype), out)
        return gx, zeros, (None if zeros is None else zeros.copy())
    if training:
        mean, invstd = save_mean, save_invstd
    else:
        mean = running_mean
        invstd = invstd_from_var(xp, running_var.astype(xp.float64), eps)
    direct = _direct_out(xp, out, gy, x, weight, mean, invstd)
    gx, gw, gb = backend.backward(gy, x, weight, mean, invstd, training, out=direct,
                                  param_grads=param_grads)
    return _deliver(gx, out), gw, gb


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, out=None):
    """Batch normalization with the signature of ``torch.nn.functional.batch_norm``.

    Returns only the output; running statistics are updated in place when
    ``training`` is True and they are given. ``out`` as in :func:`batch_norm_forward`.
    """
    y, _, _ = batch_norm_forward(x, weight, bias, running_mean, running_var, training,
                                 momentum, eps, out=out)
    return y
