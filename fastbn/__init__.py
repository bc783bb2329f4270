"""fastbn: PyTorch-exact Batch Normalization for NumPy and CuPy arrays.

NumPy arrays run on Cython/OpenMP kernels, CuPy arrays on CUDA kernels; the
module classes and their running-statistics logic are the same for both.
"""
__version__ = "0.1.0"

from ._config import show_config
from ._memory import get_output_cache, set_output_cache
from ._threads import get_num_threads, set_num_threads
from .functional import batch_norm, batch_norm_backward, batch_norm_forward
from .modules import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .sync import SyncBatchNorm, allreduce_gradients

__all__ = [
    "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
    "allreduce_gradients",
    "batch_norm", "batch_norm_forward", "batch_norm_backward",
    "set_num_threads", "get_num_threads", "set_output_cache", "get_output_cache",
    "show_config", "__version__",
]
