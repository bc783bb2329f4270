"""Choose the kernel layout of an input without copying when possible.

The kernels know two layouts:

``"outer"``  channels outside the contiguous run: ``x`` viewed as ``(N, C, S)``,
             S = prod(spatial dims), C-contiguous (NCHW, NCDHW, ``(N, C, L)``).
``"inner"``  channels are the contiguous run: ``x`` viewed as ``(M, C)`` (2-D
             ``(N, C)``, and channels-last NHWC / NDHWC memory seen as NCHW / NCDHW).

Anything else is copied to C order first. This module only uses attributes that
NumPy and CuPy arrays share, so both backends use it.
"""
from math import prod

from ._memory import contiguous as _contiguous
from ._memory import empty as _empty


class Plan:
    """How the kernels see an input: its layout, kernel view and sizes.

    A plain class with slots, not a dataclass: it is built on every call, and
    the dataclass' generated ``__init__`` cost about twice as much.
    """
    __slots__ = ("kind", "view", "shape", "count", "spatial")

    def __init__(self, kind, view, shape, count, spatial):
        self.kind = kind          # "outer" or "inner"
        self.view = view          # (N, C, S) or (M, C) view of the (possibly copied) input
        self.shape = shape        # the user's shape
        self.count = count        # values per channel (N * S)
        self.spatial = spatial    # S = prod(shape[2:])

    def _keeps_channels_last(self):
        """Whether outputs are channels-last memory (NHWC) seen in the user's shape."""
        return self.kind == "inner" and len(self.shape) > 2 and self.spatial > 1

    def empty_output(self, xp, dtype):
        """Allocate an output in the same memory layout; return (user_array, kernel_view)."""
        shape = self.shape
        if self._keeps_channels_last():
            n_chan = shape[1]
            last = (shape[0],) + tuple(shape[2:]) + (n_chan,)
            out = _empty(xp, last, dtype)
            # transpose with explicit axes: the same view as moveaxis(out, -1, 1), ~20x cheaper
            back = (0, len(last) - 1) + tuple(range(1, len(last) - 1))
            return out.transpose(back), out.reshape(self.count, n_chan)
        # allocated in the kernel's shape: one reshape (to the user's) instead of two,
        # none for (N, C)
        out = _empty(xp, self.view.shape, dtype)
        return (out if len(shape) == 2 else out.reshape(shape)), out

    def output(self, xp, dtype, out=None):
        """Like :meth:`empty_output`, but use ``out`` when its memory already suits the kernel.

        Returns ``(array, kernel_view)``; ``array is out`` tells the caller that the
        kernel writes straight into ``out``.
        """
        if out is not None and self._suits(out):
            return out, self.view_of(out)
        return self.empty_output(xp, dtype)

    def _suits(self, a):
        if self._keeps_channels_last():
            return _channels_last(a)
        return a.flags.c_contiguous

    def view_of(self, a):
        """View ``a`` (same shape as the input, same layout kind) as the kernel sees it."""
        n_chan = self.shape[1]
        if self.kind == "outer":
            return a.reshape(self.shape[0], n_chan, self.spatial)
        if self._keeps_channels_last():
            a = a.transpose((0,) + tuple(range(2, a.ndim)) + (1,))
        return a.reshape(self.count, n_chan)

    def conform(self, xp, a):
        """Kernel view of ``a`` in this plan's layout, copying only when ``a``'s differs."""
        n_chan = self.shape[1]
        if self.kind == "outer":
            return _contiguous(xp, a).reshape(self.shape[0], n_chan, self.spatial)
        if self._keeps_channels_last():
            a = a.transpose((0,) + tuple(range(2, a.ndim)) + (1,))
        return _contiguous(xp, a).reshape(self.count, n_chan)


def _channels_last(x):
    """True when moving axis 1 last gives a C-contiguous array (NHWC memory)."""
    axes = (0,) + tuple(range(2, x.ndim)) + (1,)
    return x.transpose(axes).flags.c_contiguous


def plan(xp, x):
    """Pick the layout for ``x`` (ndim >= 2, channels on axis 1)."""
    shape = tuple(x.shape)
    n_batch, n_chan = shape[0], shape[1]
    spatial = prod(shape[2:])
    count = n_batch * spatial
    if len(shape) == 2 or spatial == 1:
        flat = x.reshape(n_batch, n_chan) if len(shape) > 2 else x
        return Plan("inner", _contiguous(xp, flat), shape, count, spatial)
    if x.flags.c_contiguous:
        return Plan("outer", x.reshape(n_batch, n_chan, spatial), shape, count, spatial)
    if _channels_last(x):
        view = x.transpose((0,) + tuple(range(2, x.ndim)) + (1,)).reshape(count, n_chan)
        return Plan("inner", view, shape, count, spatial)
    return Plan("outer", _contiguous(xp, x).reshape(n_batch, n_chan, spatial),
                shape, count, spatial)
