"""Communicator adapters for :class:`fastbn.SyncBatchNorm`.

SyncBatchNorm needs exactly two collectives on small float64 vectors (O(C)
values): an all-gather and a sum all-reduce. This module gives them one shape,
whatever the user passed as ``comm``:

- an mpi4py communicator (``mpi4py.MPI.Comm``), or any object with its
  ``Get_rank``, ``Get_size``, ``Allgather`` and ``Allreduce`` methods;
- a ``cupyx.distributed.NCCLBackend`` (``cupyx.distributed.init_process_group``);
- a raw ``cupy.cuda.nccl.NcclCommunicator``;
- an instance of :class:`Communicator` (a user-written adapter).

Objects are recognised by their methods, never by importing mpi4py or CuPy, so
``import fastbn`` stays free of both. Every adapter takes and returns host
NumPy float64 arrays: the vectors are tiny, so the host round trip of the NCCL
adapters costs little next to the synchronisation the collective implies, and
SyncBatchNorm needs the exchanged counts and status flags on the host anyway
to decide, identically on every rank, whether to raise.
"""
import numpy as np

__all__ = ["Communicator", "MPICommunicator", "NCCLBackendCommunicator",
           "NcclCommunicator", "as_communicator"]


class Communicator:
    """The interface SyncBatchNorm uses; subclass it to plug in another transport.

    Attributes
    ----------
    rank : int
        This process's index, ``0 <= rank < size``.
    size : int
        Number of processes taking part.

    Notes
    -----
    Both methods are collectives: every rank must call them in the same order
    with buffers of the same length.
    """

    rank = 0
    size = 1

    def allgather(self, send):
        """Gather ``send`` (1-D float64, length n) from every rank.

        Returns
        -------
        numpy.ndarray
            Shape ``(size, n)``; row r is rank r's buffer.
        """
        raise NotImplementedError

    def allreduce(self, send):
        """Element-wise sum of ``send`` (1-D float64) over all ranks, as a new array."""
        raise NotImplementedError


def _host64(send):
    # The collectives below read raw memory, so hand them contiguous float64.
    return np.ascontiguousarray(send, dtype=np.float64)


class MPICommunicator(Communicator):
    """Adapter for an mpi4py communicator (or anything with its four methods).

    Uses the buffer-based (upper-case) methods, which send the float64 data
    without pickling. The default reduction op of ``Allreduce`` is the sum, so
    the adapter never has to import mpi4py itself.
    """

    def __init__(self, comm):
        self.comm = comm
        self.rank = int(comm.Get_rank())
        self.size = int(comm.Get_size())

    def allgather(self, send):
        send = _host64(send)
        recv = np.empty((self.size, send.size), np.float64)
        self.comm.Allgather(send, recv)
        return recv

    def allreduce(self, send):
        send = _host64(send)
        recv = np.empty_like(send)
        self.comm.Allreduce(send, recv)
        return recv


class _NCCLBase(Communicator):
    """Shared host <-> device staging for the NCCL adapters."""

    def __init__(self, comm):
        import cupy  # only reached when the user already holds an NCCL communicator

        self.comm = comm
        self._cupy = cupy

    def _run(self, send, out_rows, call):
        cupy = self._cupy
        dev_in = cupy.asarray(_host64(send))
        dev_out = cupy.empty((out_rows, dev_in.size), cupy.float64)
        call(dev_in, dev_out)
        # .get() waits for the current stream, on which the collective was queued.
        return dev_out.get()


class NCCLBackendCommunicator(_NCCLBase):
    """Adapter for ``cupyx.distributed.NCCLBackend``."""

    def __init__(self, comm):
        super().__init__(comm)
        self.rank = int(comm.rank)
        # NCCLBackend keeps the world size only in this attribute.
        self.size = int(comm._n_devices)

    def allgather(self, send):
        return self._run(send, self.size,
                         lambda a, b: self.comm.all_gather(a, b, a.size))

    def allreduce(self, send):
        return self._run(send, 1, lambda a, b: self.comm.all_reduce(a, b, "sum"))[0]


class NcclCommunicator(_NCCLBase):
    """Adapter for a raw ``cupy.cuda.nccl.NcclCommunicator``."""

    def __init__(self, comm):
        super().__init__(comm)
        from cupy.cuda import nccl

        self._nccl = nccl
        self.rank = int(comm.rank_id())
        self.size = int(comm.size())

    def _stream(self):
        return self._cupy.cuda.get_current_stream().ptr

    def allgather(self, send):
        nccl = self._nccl
        return self._run(send, self.size, lambda a, b: self.comm.allGather(
            a.data.ptr, b.data.ptr, a.size, nccl.NCCL_FLOAT64, self._stream()))

    def allreduce(self, send):
        nccl = self._nccl
        return self._run(send, 1, lambda a, b: self.comm.allReduce(
            a.data.ptr, b.data.ptr, a.size, nccl.NCCL_FLOAT64, nccl.NCCL_SUM,
            self._stream()))[0]


def _has(obj, *names):
    return all(callable(getattr(obj, n, None)) for n in names)


def as_communicator(comm):
    """Wrap ``comm`` in a :class:`Communicator`; ``None`` stays ``None``.

    Raises
    ------
    TypeError
        When ``comm`` is none of the supported kinds.
    """
    if comm is None or isinstance(comm, Communicator):
        return comm
    if _has(comm, "Get_rank", "Get_size", "Allgather", "Allreduce"):
        return MPICommunicator(comm)
    if _has(comm, "all_gather", "all_reduce") and hasattr(comm, "_n_devices"):
        return NCCLBackendCommunicator(comm)
    if _has(comm, "allGather", "allReduce", "rank_id", "size"):
        return NcclCommunicator(comm)
    cls = type(comm)
    raise TypeError(f"comm must be an mpi4py communicator, a cupyx.distributed NCCLBackend, "
                    f"a cupy.cuda.nccl.NcclCommunicator or a fastbn Communicator, got "
                    f"{cls.__module__}.{cls.__qualname__}")
