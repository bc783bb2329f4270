"""Ranks simulated with threads, for SyncBatchNorm tests without MPI."""
import threading

import numpy as np

from fastbn._comm import Communicator


class ThreadWorld:
    """Shared slots and a barrier: each collective is an exchange of all ranks' buffers."""

    def __init__(self, size, timeout=20):
        self.size = size
        self.slots = [None] * size
        # A timeout turns a would-be hang (a rank skipping a collective) into an error.
        self.barrier = threading.Barrier(size, timeout=timeout)

    def exchange(self, rank, buf):
        self.slots[rank] = np.array(buf, np.float64)
        self.barrier.wait()
        rows = np.stack(self.slots)
        self.barrier.wait()   # nobody overwrites a slot before everyone has read it
        return rows


class ThreadComm(Communicator):
    """One simulated rank; records every collective it is asked for."""

    def __init__(self, world, rank):
        self.world, self.rank, self.size = world, rank, world.size
        self.calls = []

    def allgather(self, send):
        self.calls.append("allgather")
        return self.world.exchange(self.rank, send)

    def allreduce(self, send):
        self.calls.append("allreduce")
        return self.world.exchange(self.rank, send).sum(axis=0)

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def run_ranks(size, body, timeout=20, join=60):
    """Run ``body(comm)`` on ``size`` threads; return each rank's result or exception.

    ``timeout`` bounds each collective's wait, ``join`` each rank's whole run.
    """
    world = ThreadWorld(size, timeout)
    comms = [ThreadComm(world, r) for r in range(size)]
    results = [None] * size

    def target(r):
        try:
            results[r] = body(comms[r])
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            results[r] = exc

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join)
    assert not any(t.is_alive() for t in threads), "a simulated rank hung"
    return results
