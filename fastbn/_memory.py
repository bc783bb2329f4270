"""Output arrays of the kernels, and the cache that reuses the memory of large ones.

A fresh large array costs page faults when it is first written: the operating
system maps and zeroes every page (2 MiB at a time where NumPy asks for
transparent huge pages, sometimes after compacting memory first). glibc gives
blocks above its mmap threshold (at most 32 MiB) back to the system as soon as
they are freed, so a loop that makes outputs of such a size pays this on every
call. Measured with ``benchmarks/output_cache.py`` on the 2-core EPYC (2 threads,
two rounds each of cache off and on; the output is dropped after each call):
(32, 64, 112, 112) float32 forward-train 13.0-15.0 ms against 7.1-7.2 ms (the kernel
alone: 6.9-7.3 ms), eval 9.2-10.1 against 4.2 ms, backward 16.2-16.9 against
9.7-10.2 ms; float64 (32, 64, 56, 56) channels-last backward 10.0-10.3 against
6.1-6.3 ms (benchmarks/results/output-cache-2026-11-28-epyc-2c-run1.txt). The
copy that an input in another layout needs before the kernel is such an array too:
forward-train of a strided (32, 64, 112, 112) float32 view took 34.5-34.7 ms against
18.8-19.2 ms (run2 there).

So the memory of a large NumPy output or copy, once no array uses it, waits here
for the next call that needs the same number of bytes, up to a limit in total (the
oldest waiting block is dropped first when a newer one needs the room).
"""
import os
import threading
from collections import OrderedDict
from math import prod

from . import _cpu
from ._validation import check_cache_bytes

# NumPy outputs from this size on come from the cache. They start on a cache line,
# so the kernels can write every line with streaming stores (a line shared with a
# neighbouring run is stored plainly; NumPy aligns large arrays to 16 bytes only).
# Smaller ones never stream and NumPy's allocator reuses them cheaply: an array
# from the cache takes 3.3 us (timeit, 1 MiB, kept block), np.empty 0.2 us.
BLOCK_FROM_BYTES = 1 << 20
DEFAULT_LIMIT = 256 << 20


class _OutputCache:
    """Idle blocks (1-D uint8 NumPy arrays, 64 bytes longer than their outputs), found
    by size and dropped oldest first; every operation takes constant time, whatever
    the number of blocks kept (a list scanned on each call cost 5 us more per call
    with 200 sizes kept)."""

    def __init__(self, limit):
        self.limit = limit
        self.by_size = {}                   # nbytes -> [block, ...], oldest first
        self.by_age = OrderedDict()         # id(block) -> (nbytes, block), oldest first
        self.kept_bytes = 0
        self._new_lock()
        # a forked child inherits the lock as it was: held, if another thread held it
        # (os.register_at_fork is POSIX-only; Windows has no fork)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._new_lock)

    def _new_lock(self):
        # reentrant: a garbage collection or a finalizer that runs inside a locked
        # section can drop the last array of an output, and so call release()
        self.lock = threading.RLock()

    def take(self, np, nbytes):
        block = None
        with self.lock:
            blocks = self.by_size.get(nbytes)
            if blocks:
                block = blocks.pop()        # the newest: likeliest still in cache
                if not blocks:
                    del self.by_size[nbytes]
                self.by_age.pop(id(block), None)
                self.kept_bytes -= nbytes
        if block is None:
            block = np.empty(nbytes + 64, np.uint8)
        return np.asarray(_cpu.OutputBlock(block, nbytes, self.release))

    def release(self, block):
        nbytes = block.nbytes - 64
        with self.lock:
            if nbytes <= self.limit:
                self.by_size.setdefault(nbytes, []).append(block)
                self.by_age[id(block)] = (nbytes, block)
                self.kept_bytes += nbytes
                self._trim()

    def _trim(self):
        while self.by_age and self.kept_bytes > self.limit:
            nbytes, block = self.by_age.popitem(last=False)[1]
            blocks = self.by_size.get(nbytes, [])
            for i, b in enumerate(blocks):      # the oldest of its size: i == 0
                if b is block:
                    del blocks[i]
                    break
            if not blocks:
                self.by_size.pop(nbytes, None)
            self.kept_bytes -= nbytes
        if not self.by_age:
            # resynchronised where it is cheap: an exception (KeyboardInterrupt)
            # between two updates above must not leave bytes counted for no block
            self.kept_bytes = 0

    def set_limit(self, limit):
        with self.lock:
            old, self.limit = self.limit, limit
            self.kept_bytes = sum(n for n, _ in self.by_age.values())
            self._trim()
        return old

    def info(self):
        with self.lock:
            return self.limit, sum(n for n, _ in self.by_age.values()), len(self.by_age)


_cache = _OutputCache(DEFAULT_LIMIT)


def empty(xp, shape, dtype):
    """``xp.empty(shape, dtype)``; large NumPy outputs are 64-byte aligned and cached."""
    dtype = xp.dtype(dtype)
    nbytes = prod(shape) * dtype.itemsize
    if nbytes < BLOCK_FROM_BYTES or xp.__name__ != "numpy":
        return xp.empty(shape, dtype)
    return _cache.take(xp, nbytes).view(dtype).reshape(shape)


def contiguous(xp, a):
    """``xp.ascontiguousarray(a)``; a large NumPy copy takes its memory from the cache
    (the kernels' copies of inputs in other layouts are dropped after the call)."""
    if a.flags.c_contiguous or a.nbytes < BLOCK_FROM_BYTES or xp.__name__ != "numpy":
        return xp.ascontiguousarray(a)
    out = empty(xp, a.shape, a.dtype)
    xp.copyto(out, a)
    return out


def set_output_cache(max_bytes):
    """Set how much memory of freed outputs fastbn keeps for reuse.

    Large CPU outputs (1 MiB and more), and the copies that inputs in other layouts
    need before the kernels run, get memory from a cache: when the last array using
    such memory is gone, fastbn keeps it, up to ``max_bytes`` in all, for the next
    call that needs the same number of bytes. A training loop then writes its
    outputs into memory that is already mapped, instead of paying the page faults
    of fresh memory on every call. The oldest kept block is dropped first when a
    newer one needs the room. CuPy outputs use CuPy's memory pool instead.

    Parameters
    ----------
    max_bytes : int
        The limit in bytes (default 256 MiB); 0 turns the cache off. Lowering it
        drops the kept blocks that no longer fit, at once.

    Returns
    -------
    int
        The previous limit.
    """
    return _cache.set_limit(check_cache_bytes(max_bytes))


def get_output_cache():
    """The output cache's state: ``(max_bytes, kept_bytes, kept_blocks)``."""
    return _cache.info()
