import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _restore_threads():
    """Tests that change the thread count must not leak it into others."""
    from fastbn import _threads

    saved = _threads._num_threads
    yield
    _threads._num_threads = saved
