"""float32 moments are summed in float32 partials (fastbn/_kernels.h, the "_f32p" kernels).

The slow reference beside them is the same library with the partials switched off
(``_cpu.set_float32_partials(False)``: every value widened to float64, as for float64
input); both are checked against the float64 NumPy reference, on ordinary data at
large offsets, on data built to round the worst way, and on the data the partials
must hand back to float64 (a shift far from the mean, squares outside float32's
range, NaN). The grad sums have no float32 partials (see _kernels.h).
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
