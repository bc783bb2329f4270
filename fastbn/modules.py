"""BatchNorm modules with PyTorch's state logic, for NumPy and CuPy arrays."""
from collections import OrderedDict, namedtuple

import numpy as np

from . import _validation as v
from ._array import is_cupy_array, to_numpy
from .functional import batch_norm_backward, batch_norm_forward

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

LoadResult = namedtuple("LoadResult", ["missing_keys", "unexpected_keys"])

_STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _cupy_for(index):
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError("device 'cuda' needs CuPy: pip install cupy-cuda13x") from exc
    return cupy, cupy.cuda.Device(0 if index is None else index)


def _usable_cupy_for(index):
    """:func:`_cupy_for`, after checking that the device exists (on placing a module).

    Without the check, a machine with CuPy but no driver fails later with CUDA's
    own words (``cudaErrorInsufficientDriver``) at the first array.
    """
    cupy, dev = _cupy_for(index)
    name = "cuda" if index is None else f"cuda:{index}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise RuntimeError(f"device {name!r} is not usable on this machine: CUDA reports "
                           f"{exc} (fastbn.show_config() shows what CuPy sees)") from exc
    if dev.id >= count:
        raise ValueError(f"device {name!r} does not exist: this machine has {count} CUDA "
                         f"device(s)")
    return cupy, dev


class BatchNorm:
    """Batch normalization over axis 1 with PyTorch's parameters, buffers and state.

    Parameters
    ----------
    num_features : int
        Number of channels C (axis 1 of the input).
    eps : float, default 1e-5
        Added to the variance.
    momentum : float or None, default 0.1
        Weight of the new batch in the running-statistics update; ``None``
        gives the cumulative average (factor ``1 / num_batches_tracked``).
    affine : bool, default True
        Learn ``weight`` (ones) and ``bias`` (zeros).
    track_running_stats : bool, default True
        Keep ``running_mean``, ``running_var`` and ``num_batches_tracked``.
    bias : bool, default True (keyword only)
        With ``affine=True``, whether to have a ``bias``.
    dtype : numpy dtype, default float32
        float32 or float64; inputs must have the same dtype.
    device : str, default "cpu"
        ``"cpu"`` (NumPy arrays) or ``"cuda"`` / ``"cuda:N"`` (CuPy arrays).

    Notes
    -----
    ``bn(x)`` and ``bn.backward(gy)`` follow ``torch.nn.BatchNorm*d``. Unlike
    PyTorch, a call that raises leaves every parameter and buffer unchanged.
    """

    _ndims = None          # allowed input ranks; None means any rank >= 2
    _rank_text = None      # PyTorch's wording of the allowed ranks

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, bias=True, dtype=np.float32, device="cpu"):
        self.num_features = v.check_num_features(num_features)
        v.check_eps(eps, training=False)
        self.eps = eps
        v.check_momentum(momentum, allow_none=True)
        self.momentum = momentum      # as given: repr prints momentum=0 as PyTorch does
        self.affine = v.check_flag(affine, "affine")
        self.track_running_stats = v.check_flag(track_running_stats, "track_running_stats")
        use_bias = v.check_flag(bias, "bias")
        self._dtype = v.check_dtype(dtype)
        self._device = v.parse_device(device)
        if self._device[0] == "cuda":
            _usable_cupy_for(self._device[1])
        self.training = True
        xp = self._xp()
        with self._device_context():
            c, dt = self.num_features, self._dtype
            self.weight = xp.ones(c, dt) if self.affine else None
            self.bias = xp.zeros(c, dt) if self.affine and use_bias else None
            if self.track_running_stats:
                self.running_mean = xp.zeros(c, dt)
                self.running_var = xp.ones(c, dt)
                self.num_batches_tracked = xp.zeros((), np.int64)
            else:
                self.running_mean = self.running_var = self.num_batches_tracked = None
        self.grad_weight = None
        self.grad_bias = None
        self._saved = None
        # whether grad_weight/grad_bias come from a backward after the last forward
        # (allreduce_gradients refuses stale ones)
        self._fresh_grads = False

    # -- device helpers -----------------------------------------------------
    def _xp(self):
        if self._device[0] == "cpu":
            return np
        return _cupy_for(self._device[1])[0]

    def _device_context(self):
        if self._device[0] == "cpu":
            import contextlib

            return contextlib.nullcontext()
        return _cupy_for(self._device[1])[1]

    @property
    def device(self):
        kind, index = self._device
        return kind if index is None else f"{kind}:{index}"

    @property
    def dtype(self):
        return self._dtype

    # -- modes ----------------------------------------------------------------
    def train(self, mode=True):
        """Set training mode (``mode=True``) or eval mode; returns self."""
        self.training = v.check_flag(mode, "mode")
        return self

    def eval(self):
        """Set eval mode; returns self."""
        return self.train(False)

    def reset_running_stats(self):
        """Running mean 0, running variance 1, ``num_batches_tracked`` 0."""
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def reset_parameters(self):
        """Reset the running statistics, weight to 1 and bias to 0."""
        self.reset_running_stats()
        if self.weight is not None:
            self.weight[...] = 1
        if self.bias is not None:
            self.bias[...] = 0

    # -- forward / backward ---------------------------------------------------
    def _check_input(self, x):
        v.check_input(x)
        if self._ndims is None:
            v.check_min_rank(x)
        else:
            v.check_module_rank(x, self._ndims, self._rank_text)
        v.check_module_device(type(self).__name__, self._device, x)
        if x.dtype != self._dtype:
            raise TypeError(f"input has dtype {x.dtype} but {type(self).__name__} has dtype "
                            f"{self._dtype}; convert the input with x.astype(numpy."
                            f"{self._dtype.name}) or build the module with "
                            f"dtype=numpy.{x.dtype.name}")
        v.check_num_channels(x, self.num_features)

    def forward(self, x):
        """Normalize ``x`` of shape ``(N, C, *)``; in training, update the running stats.

        Returns an array of the same shape and dtype (channels-last input keeps
        its layout). Nothing changes when it raises.
        """
        self._check_input(x)
        tracking = self.training and self.track_running_stats
        factor = 0.0 if self.momentum is None else self.momentum
        if tracking and self.momentum is None:
            factor = 1.0 / float(int(self.num_batches_tracked) + 1)
        use_batch_stats = self.training or self.running_mean is None
        pass_stats = not self.training or self.track_running_stats
        rm = self.running_mean if pass_stats else None
        rv = self.running_var if pass_stats else None
        y, save_mean, save_invstd = batch_norm_forward(
            x, self.weight, self.bias, rm, rv, use_batch_stats, factor, self.eps)
        if tracking:
            self.num_batches_tracked += 1
        self._saved = (x, self.weight, rm, rv, save_mean, save_invstd, use_batch_stats)
        self._fresh_grads = False
        return y

    __call__ = forward

    def backward(self, gy):
        """Gradient w.r.t. the input of the last forward call.

        Sets (does not accumulate) ``grad_weight`` and ``grad_bias`` (None
        without the corresponding parameter) and returns ``grad_input``.
        """
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward() was called before any "
                               f"forward() call: there is nothing to differentiate")
        x, weight, rm, rv, save_mean, save_invstd, use_batch_stats = self._saved
        gx, gw, gb = batch_norm_backward(gy, x, weight, rm, rv, save_mean, save_invstd,
                                         use_batch_stats, self.eps,
                                         param_grads=weight is not None)
        self.grad_weight = gw
        self.grad_bias = gb if self.bias is not None else None
        self._fresh_grads = True
        return gx

    # -- state ----------------------------------------------------------------
    def _state_items(self):
        for key in _STATE_KEYS:
            value = getattr(self, key)
            if value is not None:
                yield key, value

    def state_dict(self):
        """Copies of the parameters and buffers under PyTorch's keys and order."""
        sd = OrderedDict((k, a.copy()) for k, a in self._state_items())
        sd._metadata = {"": {"version": 2}}
        return sd

    def load_state_dict(self, state_dict, strict=True):
        """Copy values from ``state_dict`` into this module's own arrays.

        Accepts NumPy arrays, CuPy arrays and anything ``numpy.asarray`` takes
        (such as CPU torch tensors). A dict without version metadata (version
        < 2, or a plain dict) may lack ``num_batches_tracked``; the module then
        keeps its own, as PyTorch does. All values are checked before any is
        copied. Returns ``(missing_keys, unexpected_keys)``.
        """
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        strict = v.check_flag(strict, "strict")
        own = dict(self._state_items())
        given = dict(state_dict)
        metadata = getattr(state_dict, "_metadata", None) or {}
        version = metadata.get("", {}).get("version")
        if ((version is None or version < 2) and self.track_running_stats
                and "num_batches_tracked" not in given):
            given["num_batches_tracked"] = self.num_batches_tracked
        missing = [k for k in own if k not in given]
        unexpected = [k for k in given if k not in own]
        # PyTorch's order and wording: missing keys, unexpected keys, then the values
        errors = []
        if strict and missing:
            errors.append("Missing key(s) in state_dict: "
                          + ", ".join(f'"{k}"' for k in missing) + ". ")
        if strict and unexpected:
            errors.append("Unexpected key(s) in state_dict: "
                          + ", ".join(f'"{k}"' for k in unexpected) + ". ")
        staged = {}
        for key, target in own.items():
            if key not in given:
                continue
            value = given[key]
            host = to_numpy(value) if is_cupy_array(value) else np.asarray(value)
            if target.ndim == 0 and host.ndim == 1 and host.shape[0] > 0:
                # PyTorch's rule for old checkpoints: a 1-d value for a 0-d buffer
                # (num_batches_tracked) gives its first element
                value = host = host[0]
            if tuple(host.shape) != tuple(target.shape):
                errors.append(f"size mismatch for {key}: copying a param with shape "
                              f"{tuple(host.shape)} from checkpoint, the shape in current "
                              f"model is {tuple(target.shape)}.")
                continue
            if host.dtype.kind not in "fiub":
                errors.append(f"{key} has dtype {host.dtype}, which cannot be copied into "
                              f"a {target.dtype} array")
                continue
            staged[key] = value if is_cupy_array(value) else host
        if errors:
            raise ValueError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t"
                             + "\n\t".join(errors))
        xp = self._xp()
        with self._device_context():
            for key, value in staged.items():
                target = own[key]
                if xp is np:
                    src = to_numpy(value)
                else:
                    src = xp.asarray(value)
                target[...] = src.astype(target.dtype, copy=False)
        return LoadResult(missing, unexpected)

    def to(self, device):
        """Move parameters and buffers to ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; returns self."""
        target = v.parse_device(device)
        if target == self._device:
            return self
        if target[0] == "cuda":
            cupy, dev = _usable_cupy_for(target[1])
            with dev:
                moved = {k: cupy.asarray(a) for k, a in self._state_items()}
        else:
            moved = {k: to_numpy(a) for k, a in self._state_items()}
        for key, arr in moved.items():
            setattr(self, key, arr)
        self._device = target
        self.grad_weight = self.grad_bias = None
        self._saved = None
        return self

    def __repr__(self):
        return (f"{type(self).__name__}({self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats})")

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_saved"] = None   # the last input is not part of the module's state
        return state


class BatchNorm1d(BatchNorm):
    """Batch normalization for ``(N, C)`` or ``(N, C, L)`` input (see :class:`BatchNorm`)."""

    _ndims = (2, 3)
    _rank_text = "2D or 3D"


class BatchNorm2d(BatchNorm):
    """Batch normalization for ``(N, C, H, W)`` input (see :class:`BatchNorm`)."""

    _ndims = (4,)
    _rank_text = "4D"


class BatchNorm3d(BatchNorm):
    """Batch normalization for ``(N, C, D, H, W)`` input (see :class:`BatchNorm`)."""

    _ndims = (5,)
    _rank_text = "5D"
