"""Float32 error against a float64 reference at large offsets: fastbn vs PyTorch CPU.

    python benchmarks/accuracy.py

Prints, per layout and offset, the largest error of the normalized output
relative to the channel's standard deviation (forward, training mode).
"""
import numpy as np

import fastbn

CASES = [("NCHW (32,16,28,28)", (32, 16, 28, 28), False),
         ("NHWC (32,16,28,28)", (32, 16, 28, 28), True),
         ("(N, C) (4096,256)", (4096, 256), False)]


def _reference(x):
    x64 = x.astype(np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = x64.mean(axis=axes).reshape(shape)
    var = ((x64 - mean) ** 2).mean(axis=axes).reshape(shape)
    return (x64 - mean) / np.sqrt(var + 1e-5)


def main():
    import torch

    torch.set_num_threads(fastbn.get_num_threads())
    rng = np.random.default_rng(0)
    print(f"{'layout':<22} {'offset':>8} {'fastbn':>10} {'torch':>10}")
    for name, shape, channels_last in CASES:
        for offset in (0.0, 1e4, 1e6):
            x = (offset + rng.standard_normal(shape)).astype(np.float32)
            if channels_last:
                x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
            ref = _reference(x)
            mine = fastbn.batch_norm(x, None, None, training=True)
            tx = torch.from_numpy(np.ascontiguousarray(x))
            if channels_last:
                tx = tx.contiguous(memory_format=torch.channels_last)
            theirs = torch.nn.functional.batch_norm(tx, None, None, training=True).numpy()
            err_mine = np.abs(mine - ref).max()
            err_theirs = np.abs(theirs - ref).max()
            print(f"{name:<22} {offset:8.0e} {err_mine:10.1e} {err_theirs:10.1e}")


if __name__ == "__main__":
    main()
