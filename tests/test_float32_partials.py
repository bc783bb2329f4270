"""float32 moments are summed in float32 partials (fastbn/_kernels.h, the "_f32p" kernels).

The slow reference beside them is the same library with the partials switched off
(``_cpu.set_float32_partials(False)``: every value widened to float64, as for float64
input); both are checked against the float64 NumPy reference, on ordinary data at
large offsets, on data built to round the worst way, and on the data the partials
must hand back to float64 (a shift far from the mean, squares outside float32's
range, NaN). The backward's grad sums have float32 partials too (planes of >= 128
values, blocks of >= 32 rows, a center that is a float value); the tests at the end
hold them to the bound _kernels.h states and check their float64 fallbacks.
"""
import numpy as np
import pytest

import fastbn
from fastbn import _cpu, _cpu_backend
import reference as ref
from helpers import make

# planes of >= 128 values (shorter runs never use partials), channels-last and (N, C)
# with blocks of >= 32 folded rows (fewer take float64), narrow and wide rows, 3-D volumes
SHAPES = [((8, 6, 24, 24), "contiguous"), ((16, 6, 32, 32), "channels_last"),
          ((4096, 8), "contiguous"), ((515, 600), "contiguous"),
          ((3, 4, 16, 16, 16), "contiguous"), ((3, 4, 16, 16, 16), "channels_last")]


def _moments(x, partials):
    _cpu.set_float32_partials(partials)
    try:
        mean, m2, count = _cpu_backend.moments(x)
    finally:
        _cpu.set_float32_partials(True)
    return mean, m2 / count


@pytest.mark.parametrize("offset", [0.0, 1e4, 1e6])
@pytest.mark.parametrize("shape,layout", SHAPES)
def test_moments_match_float64_sums(offset, shape, layout):
    x = make(shape, np.float32, offset=offset, seed=31, layout=layout)
    want_mean, want_var = ref.moments(x)
    std = np.sqrt(want_var)
    for partials in (True, False):
        mean, var = _moments(x, partials)
        # measured: partials <= 1.7e-8 of the std and 2.6e-8 of the variance ((515, 600),
        # offset 0); float64 sums 1e-11 and 1e-13
        assert (np.abs(mean - want_mean) <= 1e-7 * std).all()
        np.testing.assert_allclose(var, want_var, rtol=1e-6)


@pytest.mark.parametrize("shape,layout", SHAPES)
def test_every_case_takes_the_partials(shape, layout):
    """The cases above do reach the float32 partials: their bits differ from float64 sums."""
    x = make(shape, np.float32, seed=30, layout=layout)
    assert not np.array_equal(_moments(x, True)[1], _moments(x, False)[1])


@pytest.mark.parametrize("shape", [(16, 1024), (200, 6)])
def test_few_rows_a_block_sum_in_float64(shape):
    """Blocks of fewer than 32 (folded) rows take the float64 kernel: a column of a few
    values often fails the partials' check anyway. Same bits as the partials switched off."""
    x = make(shape, np.float32, seed=29)
    for a, b in zip(_moments(x, True), _moments(x, False)):
        np.testing.assert_array_equal(a, b)


def test_switch_is_obeyed():
    """The two paths round differently, so the switch must change some bits."""
    x = make((8, 6, 24, 24), np.float32, seed=34)
    a, b = _moments(x, True), _moments(x, False)
    assert not np.array_equal(a[1], b[1])
    rows = make((515, 600), np.float32, seed=34)
    assert not np.array_equal(_moments(rows, True)[1], _moments(rows, False)[1])


PILOT_COLUMNS = [0, 5, 77, 1023]


def _with_pilot_values(x, value):
    """x with the 16 values the pilot shift averages set to ``value``: in every plane
    (channel-outer) values i * S // 16 of its S, in (M, C) with C >= 1024 (not
    folded) rows i * M // 16, for i = 0 .. 15."""
    x = x.copy()
    if x.ndim == 2:
        assert x.shape[1] >= 1024
        # four columns: fewer than FASTBN_F32P_REDO_COLUMNS fail in each block, so
        # they are summed again column by column
        x[np.ix_([i * x.shape[0] // 16 for i in range(16)], PILOT_COLUMNS)] = value
    else:
        planes = x.reshape(x.shape[0], x.shape[1], -1)
        planes[:, :, [i * planes.shape[2] // 16 for i in range(16)]] = value
    return x


@pytest.mark.parametrize("shape", [(4, 3, 16, 16), (3, 4, 16, 16, 16), (2000, 1024)])
def test_shift_far_from_the_mean_falls_back_to_float64(shape):
    """The shift is the mean of 16 values spread over a plane or a column. When those
    are a cluster 1e4 standard deviations away from the rest, the squared deviations
    from it are far more than twice M2 (FASTBN_F32_CANCEL) for every plane and every
    block of rows (blocks of 250 rows, 2 of them in the cluster), and the kernels sum
    them again in float64 (planes whole, the four columns one by one): the result is
    exact to float64 rounding (with float32 partials it would be off by about 1e-7)."""
    x = _with_pilot_values(make(shape, np.float32, seed=35), 1e4)
    want_mean, want_var = ref.moments(x)
    mean, var = _moments(x, True)
    cols = PILOT_COLUMNS if x.ndim == 2 else slice(None)
    np.testing.assert_allclose(var[cols], want_var[cols], rtol=1e-10)
    assert (np.abs(mean - want_mean)[cols] <= 1e-10 * np.sqrt(want_var[cols])).all()


def test_blocks_far_from_the_shared_shift_sum_around_their_own_mean():
    """Every block of 250 rows at its own level (0, 10, ..., 70, noise of std 1): the
    shared pilot is at least 5 std from every block's mean, so every column fails
    the check; the second float32 pass, around the block's own mean, passes it.
    The result is within the partials' error (1e-7 of each block's M2, far less
    of the total), and the partials were used (the bits differ from float64)."""
    x = make((2000, 1024), np.float32, seed=41)
    x += (np.arange(2000) // 250 * 10).astype(np.float32)[:, None]
    want_mean, want_var = ref.moments(x)
    mean, var = _moments(x, True)
    np.testing.assert_allclose(var, want_var, rtol=1e-8)
    assert (np.abs(mean - want_mean) <= 1e-7 * np.sqrt(want_var)).all()
    assert not np.array_equal(var, _moments(x, False)[1])    # partials were used


def test_many_failed_columns_redo_the_block():
    """Deviations of 1e-21 in every column: the squares are subnormal in float32, so
    both float32 passes fail the check in every column and the blocks are summed
    again whole by the float64 kernel (a cost bound: column by column, strided,
    took up to 3x the call). The result is as exact as the float64 path. This
    checks the result, not which redo ran: the column-by-column one is as exact."""
    x = (make((2000, 1024), np.float64, seed=41) * 1e-21).astype(np.float32)
    want_mean, want_var = ref.moments(x)
    mean, var = _moments(x, True)
    np.testing.assert_allclose(var, want_var, rtol=1e-10)
    assert (np.abs(mean - want_mean) <= 1e-10 * np.sqrt(want_var)).all()


def _greedy_rounding(n_rows, n_cols, seed):
    """(n_rows, n_cols) float32 built so that float32 partials round one way.

    Row 0 is 0 and every other value is picked, from candidates near a per-column
    value between 1 and 2, so that the rounding errors of running float32 sums of
    the values and their squares push M2 the same way. That was the worst case (a
    review found it) when the shift was the first row; with the pilot shift the
    deviations differ and it is ordinary data, kept as a regression case.
    """
    rng = np.random.default_rng(seed)
    x = np.zeros((n_rows, n_cols), np.float32)
    for j in range(n_cols):
        a = rng.uniform(1.0, 2.0)
        s = q = np.float32(0)
        for k in range(1, n_rows):
            if k % 8 == 0:
                s = q = np.float32(0)
            cand = (a * (1 + 0.02 * rng.standard_normal(500))).astype(np.float32)
            c64 = cand.astype(np.float64)
            exact_s = np.float64(s) + c64
            err_s = exact_s.astype(np.float32).astype(np.float64) - exact_s
            exact_q = np.float64(q) + c64 * c64
            new_q = exact_q.astype(np.float32)
            err_q = new_q.astype(np.float64) - exact_q
            pick = int(np.argmax(err_s * 2 * a * (n_rows - 1) / n_rows - err_q))
            x[k, j] = cand[pick]
            s = np.float32(s + cand[pick])
            q = new_q[pick]
    return x


@pytest.mark.parametrize("shape", [(32, 1024), (48, 1024), (64, 512)])
def test_few_rows_and_adversarial_rounding_stay_within_the_bound(shape):
    """Few rows per column (the fewest that take the partials: one block of 32 rows, or
    32 folded rows) on Gaussian data, and the data above: within the worst-case bounds
    the docs state (M2 3e-6 relative, mean 7e-7 of the std)."""
    for x in (make(shape, np.float32, seed=38), _greedy_rounding(*shape, seed=39)):
        want_mean, want_var = ref.moments(x)
        mean, var = _moments(x, True)
        np.testing.assert_allclose(var, want_var, rtol=3e-6)
        assert (np.abs(mean - want_mean) <= 7e-7 * np.sqrt(want_var)).all()


@pytest.mark.parametrize("scale", [1e20, 1e-21])
@pytest.mark.parametrize("shape,layout", SHAPES[:4])
def test_squares_outside_float32_range(scale, shape, layout):
    """1e20**2 overflows float32 and 1e-21**2 is subnormal in it (a variance that a
    float32 result can still hold); float64 holds both."""
    x = (make(shape, np.float64, seed=36, layout=layout) * scale).astype(np.float32)
    want_mean, want_var = ref.moments(x)
    mean, var = _moments(x, True)
    np.testing.assert_allclose(var, want_var, rtol=1e-6)
    assert (np.abs(mean - want_mean) <= 1e-7 * np.sqrt(want_var)).all()


@pytest.mark.parametrize("shape,layout", SHAPES[:4])
def test_variance_below_float32_range(shape, layout):
    """Deviations of 1e-25: every square is below float32's subnormals, so a partial
    sum of squares is 0 although the deviations are not; squares of 0 fail the
    check (as for a constant channel) and are summed again in float64."""
    x = (make(shape, np.float64, seed=40, layout=layout) * 1e-25).astype(np.float32)
    want_mean, want_var = ref.moments(x)
    mean, var = _moments(x, True)
    np.testing.assert_allclose(var, want_var, rtol=1e-6)
    assert (np.abs(mean - want_mean) <= 1e-7 * np.sqrt(want_var)).all()


def test_tiny_deviations_that_sum_to_zero():
    """Two neighbouring floats near 1e-16 in equal numbers (found by a review): the
    float32 partials give squares 0 and sum 0, which passed for a constant channel
    and gave variance 0; with eps = 1e-50 the output was then off by a factor 66."""
    a = np.float32(1e-16)
    b = np.nextafter(np.nextafter(a, np.float32(1)), np.float32(1))
    run = np.where(np.arange(256) // 16 % 2 == 0, a, b).astype(np.float32)
    for x in (np.tile(run, (2, 1, 1)), np.tile(run[:, None], (1, 1024))):
        want_mean, want_var = ref.moments(x)
        mean, var = _moments(x, True)
        np.testing.assert_allclose(var, want_var, rtol=1e-6)
        y, sm, si = fastbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-50)
        np.testing.assert_allclose(si, 1 / np.sqrt(want_var + 1e-50), rtol=1e-6)
        assert np.abs(y).max() < 1.01


@pytest.mark.parametrize("shape,layout", SHAPES[:4])
def test_constant_and_non_finite_channels(shape, layout):
    x = make(shape, np.float32, seed=37, layout=layout)
    x[:, 0] = 3.25                      # constant: mean exact, variance exactly 0
    x[(1, 1) + (0,) * (x.ndim - 2)] = np.nan
    x[(1, 2) + (0,) * (x.ndim - 2)] = np.inf
    on, off = _moments(x, True), _moments(x, False)
    assert on[0][0] == 3.25 and on[1][0] == 0
    for a, b in zip(on, off):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    assert np.isnan(on[1][1]) and np.isnan(on[1][2])
    want_mean, want_var = ref.moments(x[:, 3:])
    np.testing.assert_allclose(on[1][3:], want_var, rtol=1e-6)


@pytest.mark.parametrize("shape", [(257, 8192), (1000, 8192)])
def test_very_wide_rows_keep_blocks_of_32_rows(shape):
    """Rounding the block count to a multiple of 8 must not take blocks under 32 rows (for
    C >= 8192 it did, and those blocks lost the partials): the bits differ from float64."""
    x = make(shape, np.float32, seed=27)
    assert not np.array_equal(_moments(x, True)[1], _moments(x, False)[1])


# -- grad sums: sum dy, sum dy * (x - c), sum (x - c) --------------------------------

def _grad_sums(gy, x, center, partials):
    _cpu.set_float32_partials(partials)
    try:
        return np.stack(_cpu_backend.grad_sums(gy, x, center))
    finally:
        _cpu.set_float32_partials(True)


def _float_center(x):
    """The batch mean rounded to float32 (what backward passes: save_mean)."""
    return ref.moments(x)[0].astype(np.float32).astype(np.float64)


def _exact_sums(gy, x, center):
    """The three sums in float64 and the sums of their terms' magnitudes."""
    axes = (0,) + tuple(range(2, x.ndim))
    d = gy.astype(np.float64)
    e = x.astype(np.float64) - center.reshape((1, -1) + (1,) * (x.ndim - 2))
    terms = (d, d * e, e)
    return (np.stack([t.sum(axis=axes) for t in terms]),
            np.stack([np.abs(t).sum(axis=axes) for t in terms]))


GRADIENTS = {"plain": (0.0, 1.0), "common part": (5.0, 1e-2)}


@pytest.mark.parametrize("gradient", sorted(GRADIENTS))
@pytest.mark.parametrize("offset", [0.0, 1e4, 1e6])
@pytest.mark.parametrize("shape,layout", SHAPES)
def test_grad_sums_within_the_stated_bound(gradient, offset, shape, layout):
    """Each sum within FASTBN_F32_PART * 2**-24 of the sum of its terms' magnitudes (the
    worst case _kernels.h states); at large offsets, where x - c is exact, within
    8 * 2**-24 * sqrt(n) average terms (a random walk of roundings: measured up to 3.5);
    the float64 path is exact to 1e-13 of the magnitudes. The "common part" gradient
    (5 + 0.01 * noise) makes sum dy * (x - c) cancel."""
    common, noise = GRADIENTS[gradient]
    x = make(shape, np.float32, offset=offset, seed=42, layout=layout)
    gy = (common + noise * make(shape, np.float64, seed=43)).astype(np.float32)
    gy = gy if layout == "contiguous" else make_like(gy, x)
    center = _float_center(x)
    want, size = _exact_sums(gy, x, center)
    n = x.size // x.shape[1]
    on = _grad_sums(gy, x, center, True)
    off = _grad_sums(gy, x, center, False)
    assert (np.abs(on - want) <= 8 * 2.0 ** -24 * size).all()
    if offset:
        assert (np.abs(on - want) <= 8 * 2.0 ** -24 * np.sqrt(n) * size / n).all()
    assert (np.abs(off - want) <= 1e-13 * size).all()
    assert not np.array_equal(on, off)          # the partials were used


def make_like(values, x):
    """``values`` (C order) laid out in memory as ``x`` is (channels-last here)."""
    out = np.empty_like(x)
    out[...] = values
    return out


@pytest.mark.parametrize("shape,layout", SHAPES)
def test_backward_with_grad_partials_matches_float64_reference(shape, layout):
    """The whole backward at offset 1e6 with a gradient that has a large common part:
    grad_input within 1e-6 of max |dy * invstd| (the float32 rounding of the
    elementwise pass is 6e-8 of it), grad_weight within the sums' bound, and grad_input
    no further from the reference than the float64 path's plus that pass's rounding."""
    x = make(shape, np.float32, offset=1e6, seed=44, layout=layout)
    gy = make_like((5 + 1e-2 * make(shape, np.float64, seed=45)).astype(np.float32), x)
    y, sm, si = fastbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    _, mean, var = ref.forward_train(x, None, None, 1e-5)
    rgx, rgw, rgb = ref.backward(gy, x, None, mean, var, 1e-5, True)
    scale = 5.0 / np.sqrt(var + 1e-5)
    axes = (0,) + tuple(range(2, x.ndim))
    results = {}
    for partials in (True, False):
        _cpu.set_float32_partials(partials)
        try:
            results[partials] = fastbn.batch_norm_backward(gy, x, None, None, None, sm, si,
                                                           True, 1e-5)
        finally:
            _cpu.set_float32_partials(True)
    err = {p: (np.abs(r[0] - rgx).max(axis=axes) / scale) for p, r in results.items()}
    assert (err[True] <= 1e-6).all()
    assert (err[True] <= err[False] + 2.0 ** -23).all()
    size = np.abs(gy.astype(np.float64) * (x - mean.reshape((1, -1) + (1,) * (x.ndim - 2)))
                  ).sum(axis=axes) / np.sqrt(var + 1e-5)
    assert (np.abs(results[True][1] - rgw) <= 8 * 2.0 ** -24 * size + 1e-7 * np.abs(rgw)).all()
    np.testing.assert_allclose(results[True][2], rgb, rtol=1e-6)


@pytest.mark.parametrize("shape,layout", SHAPES)
def test_grad_products_past_float32_range_fall_back_to_float64(shape, layout):
    """dy and x - c of 1e20: each product (1e40) overflows float32, not float64. The
    kernels see the non-finite partial sums and sum again in float64: the same bits as
    the float64 path, and finite."""
    x = make_like((make(shape, np.float64, seed=46) * 1e20).astype(np.float32),
                  make(shape, np.float32, layout=layout))
    gy = make_like((make(shape, np.float64, seed=47) * 1e20).astype(np.float32), x)
    center = _float_center(x)
    on, off = _grad_sums(gy, x, center, True), _grad_sums(gy, x, center, False)
    assert np.isfinite(on).all()
    np.testing.assert_array_equal(on, off)


@pytest.mark.parametrize("shape,layout", SHAPES)
def test_grad_sums_with_nan_and_inf(shape, layout):
    """NaN in dy of channel 0, inf in x of channel 1: their non-finite sums are what the
    float64 path gives (a unit or block whose partial sums are not finite is summed
    again in float64), their finite sums and the other channels' are within the bound."""
    x = make(shape, np.float32, seed=48, layout=layout)
    gy = make(shape, np.float32, seed=49, layout=layout)
    gy[(1, 0) + (0,) * (x.ndim - 2)] = np.nan
    x[(1, 1) + (0,) * (x.ndim - 2)] = np.inf
    center = np.concatenate([[0.0, 0.0], _float_center(x[:, 2:])])
    on, off = _grad_sums(gy, x, center, True), _grad_sums(gy, x, center, False)
    finite = np.isfinite(off)
    assert not finite[:, :2].all() and finite[:, 2:].all()
    np.testing.assert_array_equal(np.isfinite(on), finite)
    np.testing.assert_array_equal(on[~finite], off[~finite])
    with np.errstate(invalid="ignore"):
        want, size = _exact_sums(gy, x, center)
        err = np.abs(on - want)
    assert (err[finite] <= 8 * 2.0 ** -24 * size[finite]).all()


def test_grad_partials_only_where_they_pay_and_are_exact():
    """Planes under 128 values (a 7x7 layer), blocks under 32 rows, and a center that is
    not a float value (SyncBatchNorm's float64 global mean) take the float64 kernels:
    the same bits with the switch on or off."""
    for shape in [(64, 8, 7, 7), (16, 1024)]:
        x = make(shape, np.float32, seed=50)
        gy = make(shape, np.float32, seed=51)
        center = _float_center(x)
        np.testing.assert_array_equal(_grad_sums(gy, x, center, True),
                                      _grad_sums(gy, x, center, False))
    for shape in [(8, 6, 24, 24), (4096, 8)]:
        x = make(shape, np.float32, seed=52)
        gy = make(shape, np.float32, seed=53)
        center = ref.moments(x)[0] + 1e-12       # not a float value
        np.testing.assert_array_equal(_grad_sums(gy, x, center, True),
                                      _grad_sums(gy, x, center, False))
