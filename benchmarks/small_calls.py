"""Fixed costs of small calls: fastbn against PyTorch where a call is mostly overhead.

    python benchmarks/small_calls.py [--threads N] [--number CALLS] [--repeat R]

Times, in microseconds per call, the minimum over ``--repeat`` repeats of
``--number`` calls (``timeit``), of

* the functional layer against the aten functions the main table compares with
  (``fastbn.batch_norm_forward`` / ``batch_norm_backward`` against
  ``torch.native_batch_norm`` / ``native_batch_norm_backward``), and the bare
  kernel call under it (the float/double version of the ``fastbn._cpu`` kernel
  that the CPU backend calls, on prepared views and a reused output), which shows
  what the Python layer adds;
* the modules as a training loop calls them: ``fastbn.BatchNorm1d`` against
  ``torch.nn.BatchNorm1d`` (forward under ``no_grad``, forward and backward through
  autograd, eval forward).

float32, shapes (32, 128), (512, 256) and (2, 16, 8, 16, 16). Needs torch.
"""
import argparse
import timeit

import numpy as np


def _min_us(fn, number, repeat):
    fn()
    return 1e6 * min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def _functional_rows(shape, number, repeat, torch):
    import fastbn
    from fastbn import _cpu_backend
    from fastbn._layout import plan

    rng = np.random.default_rng(0)
    c = shape[1]
    x = rng.standard_normal(shape).astype(np.float32)
    gy = rng.standard_normal(shape).astype(np.float32)
    w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    y, sm, si = fastbn.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5)
    p = plan(np, x)
    view, out = p.view, np.empty_like(p.view)
    key = (p.kind, x.dtype)
    kernels = (_cpu_backend._TRAIN[key], _cpu_backend._EVAL[key], _cpu_backend._BACKWARD[key])
    gview = gy.reshape(view.shape)
    sm2, si2 = np.empty(c, np.float32), np.empty(c, np.float32)
    gw, gb, inv = np.empty(c, np.float32), np.empty(c, np.float32), si.astype(np.float64)
    nt = fastbn._threads.threads_for(x.size)
    tx, tgy, tw, tb, trm, trv = (torch.from_numpy(a) for a in (x, gy, w, b, rm.copy(),
                                                               rv.copy()))
    _, tsm, tsi = torch.native_batch_norm(tx, tw, tb, trm, trv, True, 0.1, 1e-5)
    calls = {
        "train": (lambda: fastbn.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5),
                  lambda: kernels[0](view, out, w, b, rm, rv, sm2, si2, 0.1, 1e-5, nt),
                  lambda: torch.native_batch_norm(tx, tw, tb, trm, trv, True, 0.1, 1e-5)),
        "eval": (lambda: fastbn.batch_norm_forward(x, w, b, rm, rv, False, 0.1, 1e-5),
                 lambda: kernels[1](view, out, w, b, rm, rv, 1e-5, nt),
                 lambda: torch.native_batch_norm(tx, tw, tb, trm, trv, False, 0.1, 1e-5)),
        "backward": (
            lambda: fastbn.batch_norm_backward(gy, x, w, None, None, sm, si, True, 1e-5),
            lambda: kernels[2](gview, view, out, w, sm, inv, True, gw, gb, nt),
            lambda: torch.ops.aten.native_batch_norm_backward(
                tgy, tx, tw, trm, trv, tsm, tsi, True, 1e-5, [True, True, True])),
    }
    for mode, (api, kernel, ref) in calls.items():
        t_api, t_kernel, t_ref = (_min_us(f, number, repeat) for f in (api, kernel, ref))
        yield (f"functional {'x'.join(map(str, shape))}", mode, t_api, t_kernel, t_ref, nt)


def _module_rows(number, repeat, torch):
    import fastbn

    c, shape = 128, (32, 128)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    gy = rng.standard_normal(shape).astype(np.float32)
    bn = fastbn.BatchNorm1d(c)
    tbn = torch.nn.BatchNorm1d(c)
    tx, tgy = torch.from_numpy(x), torch.from_numpy(gy)
    txg = tx.clone().requires_grad_(True)

    def fast_step():
        bn(x)
        bn.backward(gy)

    def torch_forward():
        with torch.no_grad():
            tbn(tx)

    def torch_step():
        tbn(txg).backward(tgy)

    rows = [("train forward", lambda: bn(x), torch_forward),
            ("forward + backward", fast_step, torch_step)]
    out = []
    for mode, fast, ref in rows:
        out.append(("module 32x128", mode, _min_us(fast, number, repeat), None,
                    _min_us(ref, number, repeat), None))
    bn.eval()
    tbn.eval()
    out.append(("module 32x128", "eval", _min_us(lambda: bn(x), number, repeat), None,
                _min_us(torch_forward, number, repeat), None))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    import torch

    import fastbn

    fastbn.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    print(f"fastbn {fastbn.__version__}, torch {torch.__version__}, {args.threads} thread(s), "
          f"float32, min of {args.repeat} x {args.number} calls, us per call")
    print(f"{'case':<28} {'mode':<19} {'fastbn':>8} {'kernel':>8} {'PyTorch':>8} "
          f"{'vs PyTorch':>10} {'threads':>7}")
    rows = []
    for shape in [(32, 128), (512, 256), (2, 16, 8, 16, 16)]:
        rows.extend(_functional_rows(shape, args.number, args.repeat, torch))
    rows.extend(_module_rows(args.number, args.repeat, torch))
    for case, mode, fast, kernel, ref, nt in rows:
        kernel_text = f"{kernel:8.1f}" if kernel is not None else f"{'':>8}"
        nt_text = f"{nt:7d}" if nt is not None else f"{'':>7}"
        print(f"{case:<28} {mode:<19} {fast:8.1f} {kernel_text} {ref:8.1f} "
              f"{ref / fast:9.2f}x {nt_text}")


if __name__ == "__main__":
    main()
