"""Per-channel arithmetic shared by the backends (float64, O(C) work).

Everything here works on NumPy and CuPy arrays alike, so the running-statistics
update is the same code on both devices.
"""


def invstd_from_var(xp, var64, eps):
    return 1.0 / xp.sqrt(var64 + eps)


def update_running_stats(xp, running_mean, running_var, mean64, m2_64, count, momentum):
    """PyTorch's update, in float64, written into the caller's arrays in place.

    ``running_var`` takes the unbiased variance ``m2 / (count - 1)``.
    """
    if running_mean is not None:
        new = momentum * mean64 + (1.0 - momentum) * running_mean.astype(xp.float64)
        running_mean[...] = new.astype(running_mean.dtype)
    if running_var is not None:
        unbiased = m2_64 / (count - 1)
        new = momentum * unbiased + (1.0 - momentum) * running_var.astype(xp.float64)
        running_var[...] = new.astype(running_var.dtype)
