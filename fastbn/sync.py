"""Batch normalization with statistics synchronized across processes.

:class:`SyncBatchNorm` normalizes each process's shard of a batch with the
mean and variance of the whole batch, as ``torch.nn.SyncBatchNorm`` does under
data-parallel training. Each training forward makes exactly one collective (an
all-gather of every rank's per-channel count, mean and sum of squared
deviations, plus a status flag) and each training backward exactly one (a sum
all-reduce of the per-channel gradient sums, plus status flags).

The status flags are what keeps a bad input on one rank from hanging the
others: a rank whose input fails its checks still takes part in the
collective, sends "failed", and then every rank raises. No rank waits for a
collective that another rank skipped, and no rank changes any state.
"""
import numpy as np

from . import _validation as v
from ._array import to_numpy
from ._comm import as_communicator
from ._dispatch import backend_for
from ._stats import update_running_stats
from .modules import BatchNorm

__all__ = ["SyncBatchNorm", "allreduce_gradients"]

_STEPS = ("moments", "normalize", "grad_sums", "grad_input")


def _steps_of(backend):
    """The backend's step-by-step functions, or a clear error where it lacks them.

    Both shipped backends (``fastbn._cpu_backend``, ``fastbn._gpu``) have them;
    the check guards a backend added later without them.
    """
    missing = [name for name in _STEPS if not hasattr(backend, name)]
    if missing:
        raise NotImplementedError(
            f"SyncBatchNorm across processes needs the building blocks {', '.join(missing)} "
            f"in {backend.__name__}, which does not have them yet; on this device use "
            f"SyncBatchNorm with a single process, or BatchNorm")
    return backend


def merge_moments(counts, means, m2s):
    """Merge per-rank ``(count, mean, m2)`` with Chan's formula, in rank order.

    Parameters
    ----------
    counts : array of shape (R,)
        Values per channel on each rank (may be 0).
    means, m2s : arrays of shape (R, C)
        Per-rank mean and sum of squared deviations from it, float64.

    Returns
    -------
    count : float
    mean, m2 : numpy.ndarray of shape (C,), float64

    Notes
    -----
    Merging pairwise around the running mean (rather than summing raw sums and
    sums of squares) keeps full precision when the mean dwarfs the spread.
    The loop order is fixed, so every rank computes bit-identical results from
    the same gathered rows.
    """
    n = 0.0
    mean = np.zeros(means.shape[1])
    m2 = np.zeros(means.shape[1])
    for nb, mb, m2b in zip(counts, means, m2s):
        if nb == 0:
            continue
        total = n + nb
        delta = mb - mean
        mean = mean + delta * (nb / total)
        m2 = m2 + m2b + delta * delta * (n / total * nb)
        n = total
    return n, mean, m2


def _failed_ranks_text(ranks):
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


class SyncBatchNorm(BatchNorm):
    """BatchNorm whose training statistics cover the batch shards of all processes.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, bias, dtype, device
        As for :class:`fastbn.BatchNorm`; every rank must build its module with
        the same values.
    comm : communicator or None, default None (keyword only)
        An mpi4py communicator (e.g. ``mpi4py.MPI.COMM_WORLD``), a
        ``cupyx.distributed.NCCLBackend``, a ``cupy.cuda.nccl.NcclCommunicator``
        or a :class:`fastbn._comm.Communicator`. ``None`` or a world of one
        process gives plain BatchNorm.

    Notes
    -----
    In training mode with a communicator of two or more ranks:

    - forward computes the local per-channel count, mean and sum of squared
      deviations (float64), all-gathers them in one collective, merges them
      in rank order (identical on every rank), normalizes the local shard with
      the global mean and ``1/sqrt(var + eps)``, and updates the running
      statistics with the global mean and the global unbiased variance, so
      they stay equal on every rank. Shards may have different sizes, and may
      be empty, as long as the whole batch has more than one value per
      channel; otherwise every rank raises PyTorch's ValueError.
    - backward all-reduces ``sum(dy)`` and ``sum(dy * (x - mean))`` in one
      collective and returns the exact gradient w.r.t. the local shard.
      ``grad_weight`` and ``grad_bias`` are this rank's contributions (as in
      PyTorch, where the data-parallel wrapper sums or averages parameter
      gradients); :func:`allreduce_gradients` sums them for you.
    - when one rank's input is bad, that rank raises its usual error and every
      other rank raises a RuntimeError naming it; nothing changes anywhere.

    All ranks must call forward (and backward) together and in the same mode,
    as for any collective: a rank in eval mode makes no collective. In eval
    mode, or without a communicator, the module is exactly :class:`BatchNorm`.
    NumPy and CuPy inputs go through the same steps, with the building blocks
    of the input's backend (``moments``, ``normalize``, ``grad_sums``,
    ``grad_input`` of ``fastbn._cpu_backend`` or ``fastbn._gpu``, two kernel
    launches each on the GPU); the per-channel statistics stay float64 and the
    O(C) vectors exchanged pass through the host as float64.

    Pickling drops the communicator (communicators cannot be pickled); assign
    ``module.comm`` after loading.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, bias=True, comm=None, dtype=np.float32,
                 device="cpu"):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         bias=bias, dtype=dtype, device=device)
        self.comm = comm
        self._sync_saved = None

    # -- communicator -----------------------------------------------------------
    @property
    def comm(self):
        """The communicator given by the user (None for a single process)."""
        return self._comm_user

    @comm.setter
    def comm(self, comm):
        adapter = as_communicator(comm)
        self._comm_user = comm
        self._comm = adapter

    def _syncing(self):
        return self.training and self._comm is not None and self._comm.size > 1

    @classmethod
    def from_batchnorm(cls, bn, comm=None):
        """A SyncBatchNorm with ``bn``'s settings, a copy of its state, and its mode.

        Parameters
        ----------
        bn : fastbn.BatchNorm
            Any BatchNorm module (BatchNorm1d/2d/3d included); it is left as it is.
        comm : communicator or None
            See :class:`SyncBatchNorm`.
        """
        if not isinstance(bn, BatchNorm):
            raise TypeError(f"from_batchnorm expects a fastbn BatchNorm module, got "
                            f"{type(bn).__name__}")
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  bias=bn.bias is not None or not bn.affine, comm=comm, dtype=bn.dtype,
                  device=bn.device)
        new.load_state_dict(bn.state_dict())
        new.train(bn.training)
        return new

    # -- forward ------------------------------------------------------------------
    def forward(self, x):
        """Normalize ``x`` of shape ``(N, C, *)``; see the class notes for training.

        Returns an array of the same shape and dtype (channels-last input keeps
        its layout). Nothing changes when it raises, on any rank.
        """
        if not self._syncing():
            y = super().forward(x)
            self._sync_saved = None
            return y
        comm = self._comm
        n_chan = self.num_features
        # Row layout of the all-gather: [status, count, mean (C), m2 (C)].
        send = np.zeros(2 + 2 * n_chan)
        error = None
        try:
            self._check_input(x)
            v.check_eps(self.eps, training=True)
            v.check_momentum(self.momentum, allow_none=True)   # may have been reassigned
            for name in ("running_mean", "running_var"):
                v.check_writable(getattr(self, name), name)
            backend = _steps_of(backend_for(x))
            mean, m2, count = backend.moments(x)
            send[1] = count
            send[2:2 + n_chan] = to_numpy(mean)
            send[2 + n_chan:] = to_numpy(m2)
        except Exception as exc:  # reported to every rank through the collective
            error = exc
            send[:] = 0.0
            send[0] = 1.0
        with self._device_context():
            rows = comm.allgather(send)
        failed = [r for r in range(comm.size) if rows[r, 0] != 0]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"SyncBatchNorm: {_failed_ranks_text(failed)} rejected "
                               f"their input in forward(); no rank changed its state "
                               f"(rank {comm.rank}'s input was fine)")
        total, mean64, m2_64 = merge_moments(rows[:, 1], rows[:, 2:2 + n_chan],
                                             rows[:, 2 + n_chan:])
        if total == 1:
            raise ValueError("Expected more than 1 value per channel when training, got input "
                             f"size {tuple(x.shape)} on rank {comm.rank}, and 1 value per "
                             f"channel over all {comm.size} ranks together")
        xp = backend.xp
        tracking = self.track_running_stats
        factor = 0.0 if self.momentum is None else self.momentum
        if tracking and self.momentum is None:
            factor = 1.0 / float(int(self.num_batches_tracked) + 1)
        if total > 0:
            invstd64 = 1.0 / np.sqrt(m2_64 / total + self.eps)
        else:
            invstd64 = np.zeros(n_chan)   # empty global batch: nothing to normalize
        with self._device_context():
            mean_d, invstd_d = xp.asarray(mean64), xp.asarray(invstd64)
            y = backend.normalize(x, mean_d, invstd_d, self.weight, self.bias)
            if tracking and total > 0:
                update_running_stats(xp, self.running_mean, self.running_var, mean_d,
                                     xp.asarray(m2_64), total, factor)
        if tracking:
            self.num_batches_tracked += 1
        self._sync_saved = (x, self.weight, mean_d, invstd_d, total)
        self._saved = None
        self._fresh_grads = False
        return y

    __call__ = forward

    # -- backward -----------------------------------------------------------------
    def backward(self, gy):
        """Gradient w.r.t. the input of the last forward call.

        After a synchronized forward this makes one collective, which every
        rank must join. Sets (does not accumulate) ``grad_weight`` and
        ``grad_bias``: this rank's contributions, to be summed across ranks
        (see :func:`allreduce_gradients`). Returns ``grad_input``.
        """
        if self._sync_saved is None:
            return super().backward(gy)
        x, weight, mean_d, invstd_d, total = self._sync_saved
        comm = self._comm
        n_chan = self.num_features
        # Layout of the all-reduce: [sum dy (C), sum dy*(x - mean) (C), failed flag per rank].
        send = np.zeros(2 * n_chan + comm.size)
        error = None
        try:
            v.check_input(gy, "grad_output")
            v.check_same_device(x, {"grad_output": gy})
            v.check_same_shape(gy, "grad_output", x, "input")
            backend = backend_for(x)
            sum_dy, sum_dyx, _ = backend.grad_sums(gy, x, mean_d)
            sum_dy, sum_dyx = to_numpy(sum_dy), to_numpy(sum_dyx)
            send[:n_chan] = sum_dy
            send[n_chan:2 * n_chan] = sum_dyx
        except Exception as exc:  # reported to every rank through the collective
            error = exc
            send[:] = 0.0
            send[2 * n_chan + comm.rank] = 1.0
        with self._device_context():
            summed = comm.allreduce(send)
        failed = [r for r in range(comm.size) if summed[2 * n_chan + r] != 0]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"SyncBatchNorm: {_failed_ranks_text(failed)} rejected "
                               f"grad_output in backward(); no rank set any gradient "
                               f"(rank {comm.rank}'s grad_output was fine)")
        xp = backend.xp
        with self._device_context():
            gx = backend.grad_input(gy, x, weight, mean_d, invstd_d,
                                    xp.asarray(summed[:n_chan]),
                                    xp.asarray(summed[n_chan:2 * n_chan]), total)
            if weight is not None:
                invstd64 = to_numpy(invstd_d)
                self.grad_weight = xp.asarray((sum_dyx * invstd64).astype(x.dtype))
                self.grad_bias = (xp.asarray(sum_dy.astype(x.dtype))
                                  if self.bias is not None else None)
            else:
                self.grad_weight = self.grad_bias = None
        self._fresh_grads = True
        return gx

    # -- state --------------------------------------------------------------------
    def to(self, device):
        """Move parameters and buffers (see :meth:`BatchNorm.to`); returns self."""
        moved = super().to(device)
        self._sync_saved = None
        return moved

    def __getstate__(self):
        state = super().__getstate__()
        # Communicators hold process-local handles; a loaded copy runs unsynchronized.
        state["_comm_user"] = None
        state["_comm"] = None
        state["_sync_saved"] = None
        return state


def allreduce_gradients(module, comm=None, *, average=False):
    """Sum ``grad_weight`` and ``grad_bias`` of ``module`` over all ranks, in place.

    For training loops without a data-parallel wrapper that already reduces
    parameter gradients: after ``module.backward(gy)`` on every rank, this
    turns each rank's local contributions into the gradient of the whole
    batch. One collective; every rank must call it.

    Parameters
    ----------
    module : fastbn.BatchNorm
        Usually a :class:`SyncBatchNorm` after its backward.
    comm : communicator or None, default None
        Defaults to ``module.comm``. With no communicator or a world of one
        rank, nothing is done.
    average : bool, default False (keyword only)
        Divide by the number of ranks (PyTorch DDP's convention, for a loss
        averaged per rank) instead of summing.

    Raises
    ------
    RuntimeError
        On every rank, when some rank has no gradients to reduce (no backward
        since its last forward, or no affine parameters on only some ranks).
    """
    adapter = as_communicator(comm if comm is not None else getattr(module, "comm", None))
    average = v.check_flag(average, "average")
    if adapter is None or adapter.size <= 1:
        return module
    n_chan = module.num_features
    # Layout: [grad_weight (C), grad_bias (C), status per rank]. Every rank joins the
    # collective, also one with nothing to send, so that a mismatch raises everywhere
    # instead of leaving the other ranks waiting.
    no_params, stale = 1.0, 2.0
    send = np.zeros(2 * n_chan + adapter.size)
    if module.weight is None:
        send[2 * n_chan + adapter.rank] = no_params
    elif module.grad_weight is None or not getattr(module, "_fresh_grads", False):
        send[2 * n_chan + adapter.rank] = stale
    else:
        send[:n_chan] = to_numpy(module.grad_weight)
        if module.grad_bias is not None:
            send[n_chan:2 * n_chan] = to_numpy(module.grad_bias)
    with module._device_context():
        summed = adapter.allreduce(send)
    status = summed[2 * n_chan:]
    if (status == no_params).all():
        return module   # no rank has affine parameters: nothing to reduce
    problems = []
    for code, text in ((no_params, "no affine parameters (the other ranks have)"),
                       (stale, "no backward() since their last forward()")):
        ranks = [r for r in range(adapter.size) if status[r] == code]
        if ranks:
            problems.append(f"{_failed_ranks_text(ranks)} had {text}")
    if problems:
        raise RuntimeError(f"allreduce_gradients: {'; '.join(problems)}; no gradient was "
                           f"changed")
    scale = 1.0 / adapter.size if average else 1.0
    xp = module._xp()
    with module._device_context():
        module.grad_weight[...] = xp.asarray(summed[:n_chan] * scale)
        if module.grad_bias is not None:
            module.grad_bias[...] = xp.asarray(summed[n_chan:2 * n_chan] * scale)
    return module
