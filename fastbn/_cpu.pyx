# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""OpenMP kernels for batch normalization on NumPy arrays.

Two memory layouts, each with its own kernels (the layout is chosen in Python,
see ``fastbn/_layout.py``):

* channel-outer: ``x`` seen as ``(N, C, S)`` with ``S`` contiguous (NCHW, NCDHW,
  ``(N, C, L)``). A reduction's unit of work is one channel's planes of a group of
  consecutive images (see _n_groups); an elementwise pass takes runs of planes of
  one image.
* channel-inner: ``x`` seen as ``(M, C)`` with ``C`` contiguous (channels-last,
  2-D ``(N, C)``). Rows are folded by a factor ``k`` into rows of ``P = k * C``
  values so that small ``C`` (the C = 3 image stem) still gives long, vectorisable
  inner loops; column ``j`` of a folded row belongs to channel ``j % C``. The unit
  of work is a fixed-size block of folded rows (the grad_input pass, which has no
  partial sums to order, takes shorter rows, see GRAD_INPUT_ROW).

Bytes moved. Channel-outer forward-train and backward have two schedules. The
plane schedule reduces all planes in parallel, then makes the elementwise pass
over all planes; while the tensor is within about twice the L3, the second pass
finds most of it still in cache. Larger tensors use channel blocks: a thread
reduces a few consecutive channels and makes their elementwise pass right away,
from cache, so DRAM sees one read and one write (two reads and one write for
backward). The channel-inner layout reduces blocks of rows, then normalizes.
Calls that move more bytes than the L3 holds (channel-inner calls: 7/8 of it, or
5/8 for those that read their input twice) write their output with streaming
stores, which skip the read of each output line that a plain store makes first
(see ``_streams`` and fastbn/_kernels.h).

Determinism: every unit of work yields partial statistics, and partials are
merged in a fixed order (planes of a batch group in order, then groups in order;
blocks, then folded columns, then the tail). The decomposition depends only on
the shape, never on the number of threads or on which schedule runs, so results
are bit-identical for any thread count.

Accuracy: statistics are sums of deviations from a shift (channel-inner: one per
channel, a pilot mean of 16 rows' values; channel-outer: a pilot mean of 16 values
spread over each plane of 128 or more float32 values, merged plane by plane with
Chan's formula, else the first value of a group's planes), added in float64, so
the variance stays exact for data with a large mean. The mean
and variance of float32 input are summed in float32 partials of at most 8
deviations first (the ``_f32p`` kernels of _kernels.h: half the arithmetic, which
is what limits these passes on cached data), with a float64 fallback wherever a
partial could lose precision; ``set_float32_partials(False)`` widens every value
instead. The backward sums widen every value (their terms can cancel).
Elementwise passes compute ``(x - hi) * scale + shift``, where ``hi`` is the
float64 mean rounded to the input's type and the rounding left over is folded
into ``shift`` in float64, so ``x - mean`` keeps full precision even when
``|mean|`` is 1e6 times the standard deviation (``hi`` is 0 where the mean is
small enough for one multiply-add to be as accurate, see ``FMA_SAFE``).
"""
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.math cimport fabs, sqrt
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define FASTBN_HAVE_OPENMP 1
    #else
    #define FASTBN_HAVE_OPENMP 0
    static int omp_get_max_threads(void) { return 1; }
    #endif
    """
    bint FASTBN_HAVE_OPENMP
    int omp_get_max_threads() noexcept nogil

HAVE_OPENMP = bool(FASTBN_HAVE_OPENMP)

# Channel-inner blocking, a function of the shape only (see "Determinism"): at most
# MAX_BLOCKS blocks of at least MIN_BLOCK_VALUES values and MIN_BLOCK_ROWS rows,
# aiming at TARGET_BLOCKS or more blocks of about BLOCK_VALUES values (about 1 MB of
# float32). Each block costs a partial-sum row in scratch (2-3 doubles a column,
# zeroed, then merged) and a restart of the row streams: on (4096, 1024) float32,
# 16 blocks of 256 rows took 0.7x the time of 64 blocks of 64 rows for the backward
# sums; on (64, 4096), 8 blocks of 8 rows spent more time on the partial rows than
# on the data, and 2 blocks of 32 rows took 0.42x the time of the moments
# (alternating-block A/B, 2 threads).
cdef Py_ssize_t MAX_BLOCKS = 64
cdef Py_ssize_t MIN_BLOCK_VALUES = 16384
cdef Py_ssize_t MIN_BLOCK_ROWS = 32
cdef Py_ssize_t BLOCK_VALUES = 262144
cdef Py_ssize_t TARGET_BLOCKS = 8
# Fold small C into folded rows of at least this many values. Long rows stream
# best: on (100352, 64) float32 the backward sums took 0.7-0.9x the time with rows
# of 1024 values instead of 128 (alternating-block A/B, 2 threads).
cdef Py_ssize_t FOLD_TARGET = 1024
# Row blocks of fewer rows sum float32 input in float64 (see _rows_moments).
cdef Py_ssize_t F32P_MIN_ROWS = 32


# SERIAL: calls given one thread (threads_for gives small inputs one) run their
# reductions and plain elementwise loops without a parallel region. libgomp still
# starts and ends a team for a region of one thread: about 0.7 us a region, 1.5-2 us
# of a small forward-train or backward call (a (2, 16, 16) call took 3.5-4.1 us with
# OpenMP and 2.1 us built without it). The streaming and channel-block paths, which
# only large calls take, still open their region whatever the thread count.


def omp_max_threads():
    """Number of threads OpenMP would use by default (1 without OpenMP)."""
    return omp_get_max_threads()


cdef extern from "Python.h":
    int PyTraceMalloc_Track(unsigned int domain, size_t ptr, size_t size)
    int PyTraceMalloc_Untrack(unsigned int domain, size_t ptr)

# Scratch is reported to tracemalloc (under its own domain) so that tests can
# check that no call allocates more than its outputs and O(C) scratch.
cdef unsigned int TRACE_DOMAIN = 0xFA57B


cdef void* _alloc(size_t nbytes) except NULL:
    cdef void* p = malloc(nbytes if nbytes > 0 else 1)
    if p == NULL:
        raise MemoryError(f"fastbn: cannot allocate {nbytes} bytes of scratch")
    PyTraceMalloc_Track(TRACE_DOMAIN, <size_t> p, nbytes)
    return p


cdef void _free(void* p) noexcept:
    if p != NULL:
        PyTraceMalloc_Untrack(TRACE_DOMAIN, <size_t> p)
        free(p)


cdef class OutputBlock:
    """``nbytes`` of ``mem`` (a 1-D uint8 array, at least ``nbytes + 63`` long) from a
    64-byte line on, seen by NumPy as a writable uint8 array (``numpy.asarray``);
    when the last array made from it is gone, ``release(mem)`` runs.

    The output cache of fastbn/_memory.py hands out arrays made from these. NumPy
    gets the memory through ``__array_interface__``, so an array's chain of bases
    ends at the block itself: the block lives as long as any view of it. (Through
    the buffer protocol the chain would end at a memoryview, whose ``release()``
    would let the block go while the arrays still use its memory.)
    """
    cdef object mem
    cdef object release
    cdef char* start
    cdef Py_ssize_t nbytes

    def __cinit__(self, mem, Py_ssize_t nbytes, release):
        cdef unsigned char[::1] raw = mem
        cdef Py_ssize_t lead = (-(<size_t> &raw[0])) % 64
        if nbytes <= 0 or nbytes > raw.shape[0] - lead:
            raise ValueError(f"fastbn: {nbytes} aligned bytes do not fit a block of "
                             f"{raw.shape[0]}")
        self.mem = mem
        self.release = release
        self.start = <char*> &raw[lead]
        self.nbytes = nbytes

    def __dealloc__(self):
        # an error here is reported as unraisable (the memory is then simply freed)
        if self.release is not None:
            self.release(self.mem)

    @property
    def __array_interface__(self):
        return {"shape": (self.nbytes,), "typestr": "|u1",
                "data": (<size_t> self.start, False), "version": 3}


cdef inline const floating* _opt(const floating[::1] a) noexcept:
    return NULL if a is None else &a[0]


cdef inline floating* _opt_mut(floating[::1] a) noexcept:
    return NULL if a is None else &a[0]


cdef extern from "_kernels.h" nogil:
    void _stream_fence "fastbn_stream_fence"()
    enum: F32P_MIN_RUN "FASTBN_F32P_MIN_RUN"
    ctypedef struct Moments "fastbn_moments":
        double mean
        double m2
    ctypedef struct GradSums "fastbn_gradsums":
        double dy       # sum(dy)
        double dyx      # sum(dy * (x - center))
        double x        # sum(x - center)
    Moments run_moments_f64 "fastbn_run_moments_f64"(const double*, Py_ssize_t)
    Moments run_moments_f32p "fastbn_run_moments_f32p"(const float*, Py_ssize_t)
    void planes_affine_f32 "fastbn_planes_affine_f32"(const float*, float*, Py_ssize_t,
                                                      Py_ssize_t, const float*, const float*,
                                                      const float*, int)
    void planes_affine_f64 "fastbn_planes_affine_f64"(const double*, double*, Py_ssize_t,
                                                      Py_ssize_t, const double*,
                                                      const double*, const double*, int)
    enum: GRAD_LANES "FASTBN_GRAD_LANES"
    enum: MOMENT_LANES "FASTBN_MOMENT_LANES"
    Moments _group_moments "fastbn_group_moments"(double, double, double, double)
    Moments _lanes_moments "fastbn_lanes_moments"(const double*, double, double)
    void runs_moments_lanes_f32 "fastbn_runs_moments_lanes_f32"(const float*, Py_ssize_t,
                                                                Py_ssize_t, Py_ssize_t, double,
                                                                double*, int)
    void runs_moments_lanes_f64 "fastbn_runs_moments_lanes_f64"(const double*, Py_ssize_t,
                                                                Py_ssize_t, Py_ssize_t, double,
                                                                double*, int)
    GradSums _lanes_sums "fastbn_lanes_gradsums"(const double*)
    void runs_grad_lanes_f32 "fastbn_runs_grad_lanes_f32"(const float*, const float*,
                                                          Py_ssize_t, Py_ssize_t, Py_ssize_t,
                                                          double, double*, int)
    void runs_grad_lanes_f64 "fastbn_runs_grad_lanes_f64"(const double*, const double*,
                                                          Py_ssize_t, Py_ssize_t, Py_ssize_t,
                                                          double, double*, int)
    void planes_grad_input_f32 "fastbn_planes_grad_input_f32"(
        const float*, const float*, float*, Py_ssize_t, Py_ssize_t, const float*,
        const float*, const float*, const float*, int)
    void planes_grad_input_f64 "fastbn_planes_grad_input_f64"(
        const double*, const double*, double*, Py_ssize_t, Py_ssize_t, const double*,
        const double*, const double*, const double*, int)
    void rows_moments_f32 "fastbn_rows_moments_f32"(const float*, Py_ssize_t, Py_ssize_t,
                                                    Py_ssize_t, double*, double*,
                                                    const double*)
    void rows_moments_f64 "fastbn_rows_moments_f64"(const double*, Py_ssize_t, Py_ssize_t,
                                                    Py_ssize_t, double*, double*,
                                                    const double*)
    void rows_moments_f32p "fastbn_rows_moments_f32p"(const float*, Py_ssize_t, Py_ssize_t,
                                                      Py_ssize_t, double*, double*,
                                                      const double*, double*)
    void rows_affine_f32 "fastbn_rows_affine_f32"(const float*, float*, Py_ssize_t,
                                                  const float*, const float*, const float*, int)
    void rows_affine_f64 "fastbn_rows_affine_f64"(const double*, double*, Py_ssize_t,
                                                  const double*, const double*, const double*, int)
    void rows_grad_sums_f32 "fastbn_rows_grad_sums_f32"(const float*, const float*, Py_ssize_t,
                                                        Py_ssize_t, Py_ssize_t, const double*,
                                                        double*)
    void rows_grad_sums_f64 "fastbn_rows_grad_sums_f64"(const double*, const double*,
                                                        Py_ssize_t, Py_ssize_t, Py_ssize_t,
                                                        const double*, double*)
    void rows_grad_input_f32 "fastbn_rows_grad_input_f32"(const float*, const float*, float*,
                                                          Py_ssize_t, const float*,
                                                          const float*, const float*,
                                                          const float*, int)
    void rows_grad_input_f64 "fastbn_rows_grad_input_f64"(const double*, const double*,
                                                          double*, Py_ssize_t, const double*,
                                                          const double*, const double*,
                                                          const double*, int)


# ---------------------------------------------------------------------------
# per-channel arithmetic (float64), shared by both layouts
# ---------------------------------------------------------------------------

cdef inline Moments _chan_merge(Moments a, double n_a, Moments b, double n_b) noexcept nogil:
    """Moments of the union of groups a and b (Chan, Golub & LeVeque)."""
    cdef double n = n_a + n_b
    cdef double delta = b.mean - a.mean
    cdef Moments r
    r.mean = a.mean + delta * (n_b / n)
    r.m2 = a.m2 + b.m2 + delta * delta * (n_a * n_b / n)
    return r


# Where |mean * scale| <= FMA_SAFE, the one multiply-add x * scale + (shift - mean * scale)
# is as accurate as subtracting the mean first: its rounding errors are about
# 2**-24 * |mean * scale| (under 3e-7 of an output unit for float32), so hi = 0 there.
cdef double FMA_SAFE = 4.0
FMA_SAFE_LIMIT = FMA_SAFE      # the same limit, for the Python building blocks


cdef inline void _set_coefs(double mean, double scale, double shift, floating* hi,
                            floating* sc, floating* sh) noexcept nogil:
    """Coefficients of ``y = (x - hi) * sc + sh`` for ``(x - mean) * scale + shift``.

    For a large mean, ``hi`` is the mean rounded to the input's type, so ``x - hi``
    is exact (or as exact as the input's precision) even when the mean is 1e6
    standard deviations from 0; the rounding left over (``mean - hi``, in float64)
    moves into the shift. Otherwise ``hi`` is 0 (see FMA_SAFE).
    """
    cdef double lo
    sc[0] = <floating> scale
    if fabs(mean * scale) <= FMA_SAFE:
        hi[0] = 0
        sh[0] = <floating> (shift - mean * scale)
        return
    hi[0] = <floating> mean
    lo = mean - <double> hi[0]
    sh[0] = <floating> (shift - lo * scale)


cdef inline void _finish_train(Py_ssize_t c, Moments mo, double count,
                               double eps, double momentum, const floating* w,
                               const floating* b, floating* rm, floating* rv,
                               floating* save_mean, floating* save_invstd, floating* hi,
                               floating* sc, floating* sh) noexcept nogil:
    """Saved statistics, running-stat update (PyTorch's, in float64) and coefficients."""
    cdef double mean = mo.mean, m2 = mo.m2
    cdef double invstd = 1.0 / sqrt(m2 / count + eps)
    save_mean[c] = <floating> mean
    save_invstd[c] = <floating> invstd
    if rm != NULL:
        rm[c] = <floating> (momentum * mean + (1.0 - momentum) * rm[c])
        rv[c] = <floating> (momentum * (m2 / (count - 1)) + (1.0 - momentum) * rv[c])
    _set_coefs(mean, invstd * (1.0 if w == NULL else w[c]), 0.0 if b == NULL else b[c],
               &hi[c], &sc[c], &sh[c])


cdef void _eval_coefs(Py_ssize_t n_chan, const floating* w, const floating* b,
                      const floating* rm, const floating* rv, double eps, floating* hi,
                      floating* sc, floating* sh) noexcept nogil:
    """Coefficients of eval mode: ``(x - running_mean) * invstd * w + b``."""
    cdef Py_ssize_t c
    for c in range(n_chan):
        _set_coefs(rm[c], (1.0 / sqrt(<double> rv[c] + eps)) * (1.0 if w == NULL else w[c]),
                   0.0 if b == NULL else b[c], &hi[c], &sc[c], &sh[c])


cdef inline void _finish_backward(Py_ssize_t c, GradSums sums, double center,
                                  double invstd, double count,
                                  bint training, const floating* w, floating* gw,
                                  floating* gb, floating* hi, floating* ak, floating* mk,
                                  floating* k) noexcept nogil:
    """grad_weight / grad_bias and the coefficients of grad_input for one channel.

    grad_input = ``dy * k - ((x - hi) * ak + mk)``, which is
    ``(dy - mean(dy) - xhat * mean(dy * xhat)) * invstd * w`` with ``x - mean``
    split as in :func:`_set_coefs` (``hi`` is 0 when the mean is within FMA_SAFE
    standard deviations of 0, the rounding of ``x * ak`` being as small then).
    In training the true batch mean is ``center + sum_x / count``; the sums were
    taken around ``center`` (the saved mean), so the correction is exact.
    """
    cdef double offset, sum_dy = sums.dy, sum_dyx = sums.dyx, sum_x = sums.x
    cdef double lo, slope, mean_dy, scale
    if training:
        offset = sum_x / count
        center = center + offset
        sum_dyx = sum_dyx - offset * sum_dy
    if gw != NULL:
        gw[c] = <floating> (sum_dyx * invstd)
        gb[c] = <floating> sum_dy
    scale = invstd * (1.0 if w == NULL else w[c])
    k[c] = <floating> scale
    if not training:
        # grad_input = dy * k: the kernels then read dy only (see _x_term_vanishes), so
        # an inf or NaN in x or in the running mean cannot reach grad_input
        hi[c] = 0
        ak[c] = 0
        mk[c] = 0
        return
    slope = sum_dyx * invstd * invstd / count
    mean_dy = sum_dy / count
    if slope == 0 or fabs(center) * invstd <= FMA_SAFE:
        hi[c] = 0
    else:
        hi[c] = <floating> center
    lo = center - <double> hi[c]
    ak[c] = <floating> (slope * scale)
    mk[c] = <floating> ((mean_dy - lo * slope) * scale)


# ---------------------------------------------------------------------------
# contiguous-run kernels (one plane, or one row)
# ---------------------------------------------------------------------------

# Results are returned by value: a variable assigned in a prange body is private to
# its thread, one written through a pointer would be shared.
cdef inline Moments _run_moments(const floating* p, Py_ssize_t s) noexcept nogil:
    """One plane in float32 partials (the planes _per_run_moments picks)."""
    if floating is float:
        return run_moments_f32p(p, s)
    else:
        return run_moments_f64(p, s)


cdef inline bint _per_run_moments(const floating* p, Py_ssize_t s, bint partials) noexcept nogil:
    """Whether planes of ``s`` values (of p's type) take the float32-partials kernel
    one by one (merged with Chan's formula), rather than float64 lanes carried over a
    unit. ``partials``: the switch, read once per call by the caller (so that a call
    never mixes the two, nor frees scratch that one of them needs)."""
    if floating is float:
        return partials and s >= F32P_MIN_RUN
    else:
        return False


cdef inline void _runs_moments_lanes(const floating* p, Py_ssize_t s, Py_ssize_t count,
                                     Py_ssize_t stride, double shift, double* lanes,
                                     bint fresh) noexcept nogil:
    """Adds ``count`` runs of ``s`` values, ``stride`` apart, into ``lanes``
    (MOMENT_LANES doubles), or stores their sums there when ``fresh``."""
    if floating is float:
        runs_moments_lanes_f32(p, s, count, stride, shift, lanes, fresh)
    else:
        runs_moments_lanes_f64(p, s, count, stride, shift, lanes, fresh)


cdef inline void _planes_affine(const floating* x, floating* y, Py_ssize_t s,
                                Py_ssize_t count, const floating* hi, const floating* sc,
                                const floating* sh, bint nt) noexcept nogil:
    """``count`` planes of ``s`` values back to back, plane r with hi[r], sc[r], sh[r]."""
    if floating is float:
        planes_affine_f32(x, y, s, count, hi, sc, sh, nt)
    else:
        planes_affine_f64(x, y, s, count, hi, sc, sh, nt)


cdef inline void _runs_grad_lanes(const floating* dy, const floating* x, Py_ssize_t s,
                                  Py_ssize_t count, Py_ssize_t stride, double center,
                                  double* lanes, bint fresh) noexcept nogil:
    """Adds ``count`` runs of ``s`` values, ``stride`` apart, into ``lanes`` (GRAD_LANES
    doubles), or stores their sums there when ``fresh``."""
    if floating is float:
        runs_grad_lanes_f32(dy, x, s, count, stride, center, lanes, fresh)
    else:
        runs_grad_lanes_f64(dy, x, s, count, stride, center, lanes, fresh)


cdef inline void _planes_grad_input(const floating* dy, const floating* x, floating* gx,
                                    Py_ssize_t s, Py_ssize_t count, const floating* hi,
                                    const floating* ak, const floating* mk,
                                    const floating* k, bint nt) noexcept nogil:
    """grad_input over ``count`` planes back to back (coefficients indexed by plane)."""
    if floating is float:
        planes_grad_input_f32(dy, x, gx, s, count, hi, ak, mk, k, nt)
    else:
        planes_grad_input_f64(dy, x, gx, s, count, hi, ak, mk, k, nt)


# Planes per elementwise call in the plane schedule: about PLANE_CHUNK_VALUES values,
# never past the end of an image (the planes of a call are consecutive in memory).
cdef Py_ssize_t PLANE_CHUNK_VALUES = 4096


cdef inline Py_ssize_t _plane_chunk(Py_ssize_t n_chan, Py_ssize_t s) noexcept nogil:
    cdef Py_ssize_t cp = PLANE_CHUNK_VALUES // s if s > 0 else n_chan
    if cp > n_chan:
        cp = n_chan
    return cp if cp > 0 else 1


# ---------------------------------------------------------------------------
# channel-outer layout: (N, C, S)
# ---------------------------------------------------------------------------

# Batch groups of the channel-outer reductions: a channel's planes are reduced in
# groups of consecutive images, one (group, channel) unit of work each, and the
# groups are merged in order. Small planes come up to GROUP_PLANES to a unit (about
# GROUP_VALUES values), so that the cost of a unit (a call, a tree reduction, a merge)
# stays small against its data; more planes a unit walk too many strided streams at
# once: float32 grad sums of (32, 64, 8, 8) took 0.61x the time with 4 planes a unit
# instead of 1, (256, 512, 7, 7) 0.76-0.80x with 4 (the old 256 // 64), but 1.0-1.2x
# with 8 and 2.4x with 85 (alternating calls of two builds, 2 threads). At most
# MAX_BLOCKS groups.
cdef Py_ssize_t GROUP_VALUES = 1024
cdef Py_ssize_t GROUP_PLANES = 4


cdef inline Py_ssize_t _n_groups(Py_ssize_t n_batch, Py_ssize_t s) noexcept nogil:
    cdef Py_ssize_t per = GROUP_VALUES // s if s > 0 else GROUP_PLANES, g
    if per > GROUP_PLANES:
        per = GROUP_PLANES
    if per < 1:
        per = 1
    g = (n_batch + per - 1) // per
    return g if g < MAX_BLOCKS else MAX_BLOCKS


cdef inline Py_ssize_t _group_start(Py_ssize_t g, Py_ssize_t n_batch,
                                    Py_ssize_t groups) noexcept nogil:
    return (g * n_batch) // groups


cdef inline Moments _unit_moments(const floating[:, :, ::1] x, Py_ssize_t c, Py_ssize_t n0,
                                  Py_ssize_t n1, bint per_run) noexcept nogil:
    """Moments of channel c over images [n0, n1): float32 partials plane by plane, or
    float64 lanes around the unit's first value (one tree and no merge per plane)."""
    cdef Py_ssize_t s = x.shape[2], n
    cdef double lanes[MOMENT_LANES]
    cdef double shift
    cdef Moments acc
    if per_run:
        acc = _run_moments(&x[n0, c, 0], s)
        for n in range(n0 + 1, n1):
            acc = _chan_merge(acc, <double> ((n - n0) * s), _run_moments(&x[n, c, 0], s),
                              <double> s)
        return acc
    shift = <double> x[n0, c, 0]
    _runs_moments_lanes(&x[n0, c, 0], s, n1 - n0, x.shape[1] * s, shift, lanes, True)
    return _lanes_moments(lanes, shift, <double> ((n1 - n0) * s))


cdef inline GradSums _unit_grad_sums(const floating[:, :, ::1] dy,
                                     const floating[:, :, ::1] x, Py_ssize_t c,
                                     Py_ssize_t n0, Py_ssize_t n1,
                                     double center) noexcept nogil:
    cdef double lanes[GRAD_LANES]
    _runs_grad_lanes(&dy[n0, c, 0], &x[n0, c, 0], x.shape[2], n1 - n0,
                     x.shape[1] * x.shape[2], center, lanes, True)
    return _lanes_sums(lanes)


cdef inline GradSums _add_sums(GradSums a, GradSums b) noexcept nogil:
    a.dy += b.dy
    a.dyx += b.dyx
    a.x += b.x
    return a


cdef inline Moments _merge_units(const Moments* units, Py_ssize_t c, Py_ssize_t n_chan,
                                 Py_ssize_t n_batch, Py_ssize_t s) noexcept nogil:
    """Channel c's (group, channel) units merged in group order."""
    cdef Py_ssize_t groups = _n_groups(n_batch, s), g, n0, n1
    cdef Moments acc = units[c]
    for g in range(1, groups):
        n0 = _group_start(g, n_batch, groups)
        n1 = _group_start(g + 1, n_batch, groups)
        acc = _chan_merge(acc, <double> (n0 * s), units[g * n_chan + c],
                          <double> ((n1 - n0) * s))
    return acc


cdef void _outer_moments(const floating[:, :, ::1] x, Moments* units, Moments* out,
                         bint per_run, int num_threads) noexcept nogil:
    """Per-channel moments via (group, channel) units, units in parallel (``per_run``:
    _per_run_moments)."""
    cdef Py_ssize_t n_batch = x.shape[0], n_chan = x.shape[1], s = x.shape[2]
    cdef Py_ssize_t groups = _n_groups(n_batch, s), q, c
    if num_threads > 1:
        for q in prange(groups * n_chan, schedule="static", num_threads=num_threads):
            units[q] = _nth_unit_moments(x, q, groups, per_run)
    else:
        for q in range(groups * n_chan):     # no parallel region (see SERIAL)
            units[q] = _nth_unit_moments(x, q, groups, per_run)
    # the merges run in parallel only when there are many (a parallel region costs more
    # than a few thousand merges)
    if num_threads > 1 and groups * n_chan > 4096:
        for c in prange(n_chan, schedule="static", num_threads=num_threads):
            out[c] = _merge_units(units, c, n_chan, n_batch, s)
    else:
        for c in range(n_chan):
            out[c] = _merge_units(units, c, n_chan, n_batch, s)


cdef inline Moments _nth_unit_moments(const floating[:, :, ::1] x, Py_ssize_t q,
                                      Py_ssize_t groups, bint per_run) noexcept nogil:
    """Unit q of _outer_moments: batch group q // C, channel q % C."""
    cdef Py_ssize_t n_chan = x.shape[1], g = q // n_chan
    return _unit_moments(x, q % n_chan, _group_start(g, x.shape[0], groups),
                         _group_start(g + 1, x.shape[0], groups), per_run)


cdef void _outer_grad_sums(const floating[:, :, ::1] dy, const floating[:, :, ::1] x,
                           const double* center, GradSums* units, GradSums* out,
                           int num_threads) noexcept nogil:
    cdef Py_ssize_t n_batch = x.shape[0], n_chan = x.shape[1], s = x.shape[2]
    cdef Py_ssize_t groups = _n_groups(n_batch, s), q, g, c
    if num_threads > 1:
        for q in prange(groups * n_chan, schedule="static", num_threads=num_threads):
            units[q] = _nth_unit_grad_sums(dy, x, q, groups, center)
    else:
        for q in range(groups * n_chan):     # no parallel region (see SERIAL)
            units[q] = _nth_unit_grad_sums(dy, x, q, groups, center)
    for c in range(n_chan):
        out[c] = units[c]
        for g in range(1, groups):
            out[c] = _add_sums(out[c], units[g * n_chan + c])


# Channel blocks: a thread takes G consecutive channels and walks n outer, c inner,
# so it reads runs of G planes that are contiguous in memory (the prefetchers
# follow them), reduces them, then makes its second pass while the block is
# still in cache. The per-channel merges follow the same tree as
# _outer_moments / _outer_grad_sums.

cdef void _block_moments(const floating[:, :, ::1] x, Py_ssize_t c0, Py_ssize_t c1,
                         Moments* unit, double* lanes, Moments* chan,
                         bint per_run) noexcept nogil:
    """Moments of channels [c0, c1) into chan[c0:c1], as _unit_moments does them;
    unit[c0:c1] and ``lanes`` (MOMENT_LANES doubles a channel, needed unless
    ``per_run``) are scratch."""
    cdef Py_ssize_t n_batch = x.shape[0], s = x.shape[2]
    cdef Py_ssize_t groups = _n_groups(n_batch, s), g, n, n0, n1, c
    cdef Moments m
    for g in range(groups):
        n0 = _group_start(g, n_batch, groups)
        n1 = _group_start(g + 1, n_batch, groups)
        for n in range(n0, n1):
            for c in range(c0, c1):
                if per_run:
                    m = _run_moments(&x[n, c, 0], s)
                    unit[c] = m if n == n0 else _chan_merge(unit[c], <double> ((n - n0) * s),
                                                            m, <double> s)
                else:
                    _runs_moments_lanes(&x[n, c, 0], s, 1, 0, <double> x[n0, c, 0],
                                        lanes + c * MOMENT_LANES, n == n0)
        for c in range(c0, c1):
            if not per_run:
                unit[c] = _lanes_moments(lanes + c * MOMENT_LANES, <double> x[n0, c, 0],
                                         <double> ((n1 - n0) * s))
            chan[c] = unit[c] if g == 0 else _chan_merge(chan[c], <double> (n0 * s), unit[c],
                                                         <double> ((n1 - n0) * s))


cdef void _block_grad_sums(const floating[:, :, ::1] dy, const floating[:, :, ::1] x,
                           const double* center, Py_ssize_t c0, Py_ssize_t c1,
                           double* lanes, GradSums* chan) noexcept nogil:
    """GradSums of channels [c0, c1) into chan[c0:c1]; ``lanes`` is scratch of
    GRAD_LANES doubles a channel (all C channels, this block uses its own)."""
    cdef Py_ssize_t n_batch = x.shape[0], s = x.shape[2]
    cdef Py_ssize_t groups = _n_groups(n_batch, s), g, n, n0, n1, c
    cdef GradSums unit
    for g in range(groups):
        n0 = _group_start(g, n_batch, groups)
        n1 = _group_start(g + 1, n_batch, groups)
        for n in range(n0, n1):
            for c in range(c0, c1):
                _runs_grad_lanes(&dy[n, c, 0], &x[n, c, 0], s, 1, 0, center[c],
                                 lanes + c * GRAD_LANES, n == n0)
        for c in range(c0, c1):
            unit = _lanes_sums(lanes + c * GRAD_LANES)
            chan[c] = unit if g == 0 else _add_sums(chan[c], unit)


# Bytes a channel block touches (inputs and output together) between its two
# passes: well inside a core's L2, or the output's write-allocations evict the
# inputs just before the second pass needs them.
cdef Py_ssize_t BLOCK_BYTES = 640 * 1024
# Beyond this per-channel footprint the second pass would miss the L3 anyway.
cdef Py_ssize_t MAX_CHANNEL_BYTES = 12 * 1024 * 1024
# Below twice the L3, the plane schedule wins: its first pass leaves most of the
# tensor in the L3 for the second one, and plane order streams best. Above it,
# only channel blocks avoid a second trip to DRAM. Measured on a 2-core EPYC with
# 32 MB of L3 (benchmarks/results/): at 25-33 MB planes were 30-40% faster, at
# 103 MB channel blocks were 22% faster. Set from the machine's L3 at import.
cdef Py_ssize_t L3_BYTES = 32 * 1024 * 1024


def set_l3_bytes(Py_ssize_t nbytes):
    """Tell the kernels the last-level cache size (used to pick a schedule)."""
    global L3_BYTES
    if nbytes > 0:
        L3_BYTES = nbytes


cdef int _schedule = 0     # 0: automatic, 1: channel blocks, 2: planes


cdef int _check_mode(int mode, str name) except -1:
    """The tuning switches below take 0 (automatic), 1 or 2."""
    if mode not in (0, 1, 2):
        raise ValueError(f"{name} must be 0, 1 or 2, got {mode}")
    return mode


cdef int _streaming = 0    # 0: automatic, 1: always, 2: never


def set_streaming(int mode):
    """Force the output stores (for tests and tuning; results never change).

    0 picks automatically (see _streams), 1 always streams, 2 never does.
    """
    global _streaming
    _streaming = _check_mode(mode, "streaming mode")


cdef bint _f32_partials = True


def set_float32_partials(bint on):
    """Sum float32 input in float32 partials (the default) or widen every value.

    For tests and tuning. The ``_f32p`` kernels of _kernels.h sum short runs of
    deviations in float32 before adding them in float64; with ``on`` false every
    float32 reduction uses the float64 kernels that float64 input uses, the
    reference the partials are tested against.
    """
    global _f32_partials
    _f32_partials = on


# Where streaming starts, in eighths of the L3 (see _streams).
cdef int STREAM_OUTER = 8          # channel-outer calls
cdef int STREAM_INNER = 7          # channel-inner calls that read their input once
cdef int STREAM_INNER_REREAD = 5   # channel-inner calls that read it again after reducing


cdef inline bint _streams(Py_ssize_t nbytes, int eighths) noexcept nogil:
    """Whether a call that reads and writes ``nbytes`` in all streams its output.

    Streaming stores skip the read a plain store makes of each output line
    (write-allocate); they pay off once the output cannot stay in the L3 anyway.
    Below that the output would still be in cache for the next layer, which
    streaming would evict. The limit is ``eighths`` / 8 of the L3, measured on
    the 2-core EPYC (32 MB L3) in alternating blocks of calls, float32:

    * channel-outer (8/8): 4-24% faster at 50-200 MB (eval, backward); at
      exactly the L3 size (the 16 MiB 3-D eval, 32 MiB moved) plain stores were
      15-25% faster.
    * channel-inner eval (7/8): the per-column coefficient loads leave plain
      stores less room to profit from the L3: (4096, 1024) eval (32 MiB moved)
      took 0.80-0.99x the time with streaming, 14 MiB inputs 0.79-1.03x,
      12 MiB inputs 1.08-1.15x (plain is kept there).
    * channel-inner train and backward (5/8) read their input a second time
      after the reductions, and a plain output pushes it out of the L3 before
      that: (4096, 1024) train (32 MiB moved) 0.90x, (3072, 1024) train
      (24 MiB) 0.87x, (2048, 1024) train (16 MiB) 1.14x (plain is kept).

    A thread that streamed calls ``_stream_fence`` after its last kernel call.
    """
    return _streaming == 1 or (_streaming == 0 and nbytes > eighths * (L3_BYTES // 8))


def would_stream(Py_ssize_t nbytes, int eighths):
    """Whether a call moving ``nbytes`` streams under the current mode (for tests)."""
    return _streams(nbytes, eighths)


def set_schedule(int mode):
    """Force the channel-outer schedule (for tests and tuning; results never change).

    0 picks automatically, 1 forces channel blocks, 2 forces planes.
    """
    global _schedule
    _schedule = _check_mode(mode, "schedule")


cdef Py_ssize_t _channel_block(Py_ssize_t n_chan, Py_ssize_t channel_bytes,
                               int num_threads) noexcept nogil:
    """Channels per block for the cache-resident schedule, or 0 for the plane schedule.

    ``channel_bytes``: what one channel's planes take in all arrays the call touches.
    """
    cdef Py_ssize_t g
    if _schedule == 2:
        return 0
    if _schedule == 0 and (channel_bytes > MAX_CHANNEL_BYTES
                           or n_chan * channel_bytes <= 4 * L3_BYTES):
        return 0
    g = BLOCK_BYTES // channel_bytes if channel_bytes > 0 else n_chan
    if g < 1:
        g = 1
    # at least two blocks per thread, so that no thread waits for a straggler
    if g * 2 * num_threads > n_chan:
        g = n_chan // (2 * num_threads)
    if g < 1:
        return 1 if _schedule == 1 else 0
    return g


def channel_block(Py_ssize_t n_chan, Py_ssize_t channel_bytes, int num_threads):
    """Channels per block the schedule picks, 0 for planes (for tests)."""
    return _channel_block(n_chan, channel_bytes, num_threads)


cdef inline GradSums _nth_unit_grad_sums(const floating[:, :, ::1] dy,
                                         const floating[:, :, ::1] x, Py_ssize_t q,
                                         Py_ssize_t groups, const double* center) noexcept nogil:
    """Unit q of _outer_grad_sums: batch group q // C, channel q % C."""
    cdef Py_ssize_t n_chan = x.shape[1], g = q // n_chan, c = q % n_chan
    return _unit_grad_sums(dy, x, c, _group_start(g, x.shape[0], groups),
                           _group_start(g + 1, x.shape[0], groups), center[c])


cdef void _outer_planes(const floating* dy, const floating* x, floating* out,
                        Py_ssize_t n_batch, Py_ssize_t n_chan, Py_ssize_t s,
                        const floating* hi, const floating* a, const floating* b,
                        const floating* k, bint nt, int num_threads) noexcept nogil:
    """Plane schedule of an elementwise pass over C-contiguous (N, C, S) arrays: runs
    of planes of one image in parallel, coefficients per channel. ``dy`` NULL:
    ``out = (x - hi) * a + b`` (a: scale, b: shift); else grad_input with a = ak,
    b = mk and ``k``."""
    cdef Py_ssize_t cp = _plane_chunk(n_chan, s), per = (n_chan + cp - 1) // cp
    cdef Py_ssize_t t
    if num_threads > 1:
        with parallel(num_threads=num_threads):
            for t in prange(n_batch * per, schedule="static"):
                _plane_task(dy, x, out, t, per, cp, n_chan, s, hi, a, b, k, nt)
            if nt:
                _stream_fence()
    else:
        for t in range(n_batch * per):       # no parallel region (see SERIAL)
            _plane_task(dy, x, out, t, per, cp, n_chan, s, hi, a, b, k, nt)
        if nt:
            _stream_fence()


cdef inline void _plane_task(const floating* dy, const floating* x, floating* out,
                             Py_ssize_t t, Py_ssize_t per, Py_ssize_t cp, Py_ssize_t n_chan,
                             Py_ssize_t s, const floating* hi, const floating* a,
                             const floating* b, const floating* k, bint nt) noexcept nogil:
    """Task t of _outer_planes: planes [c0, c1) of image t // per."""
    cdef Py_ssize_t n = t // per, c0 = (t - n * per) * cp, c1 = c0 + cp, o
    if c1 > n_chan:
        c1 = n_chan
    o = (n * n_chan + c0) * s
    if dy == NULL:
        _planes_affine(x + o, out + o, s, c1 - c0, hi + c0, a + c0, b + c0, nt)
    else:
        _planes_grad_input(dy + o, x + o, out + o, s, c1 - c0, hi + c0, a + c0, b + c0,
                           k + c0, nt)


def forward_train_outer(const floating[:, :, ::1] x, floating[:, :, ::1] y,
                        const floating[::1] weight, const floating[::1] bias,
                        floating[::1] running_mean, floating[::1] running_var,
                        floating[::1] save_mean, floating[::1] save_invstd,
                        double momentum, double eps, int num_threads):
    """Batch statistics, running-stat update and normalization of ``x`` (N, C, S).

    ``weight``/``bias``/``running_*`` may be None. Requires N * S >= 2.
    """
    cdef Py_ssize_t n_batch = x.shape[0], n_chan = x.shape[1], s = x.shape[2]
    cdef Py_ssize_t planes = n_batch * n_chan, c, n
    cdef double count = <double> (n_batch * s)
    cdef const floating* w = _opt(weight)
    cdef const floating* b = _opt(bias)
    cdef floating* rm = _opt_mut(running_mean)
    cdef floating* rv = _opt_mut(running_var)
    cdef floating* sm = &save_mean[0]
    cdef floating* si = &save_invstd[0]
    cdef floating* coef = NULL
    cdef floating* hi
    cdef floating* sc
    cdef floating* sh
    cdef Moments* units = NULL
    cdef double* lanes = NULL
    cdef Py_ssize_t block = _channel_block(n_chan, 2 * n_batch * s * sizeof(floating),
                                           num_threads)
    cdef Py_ssize_t blocks = (n_chan + block - 1) // block if block else 0, k, c1
    cdef bint nt = _streams(2 * planes * s * sizeof(floating), STREAM_OUTER)
    cdef bint per_run = _per_run_moments(&x[0, 0, 0], s, _f32_partials)
    try:
        coef = <floating*> _alloc(3 * n_chan * sizeof(floating))
        hi = coef
        sc = coef + n_chan
        sh = coef + 2 * n_chan
        units = <Moments*> _alloc((_n_groups(n_batch, s) + 1) * n_chan * sizeof(Moments))
        if block and not per_run:
            lanes = <double*> _alloc(n_chan * MOMENT_LANES * sizeof(double))
        with nogil:
            if block:
                with parallel(num_threads=num_threads):
                    for k in prange(blocks, schedule="dynamic"):
                        c1 = (k + 1) * block
                        if c1 > n_chan:
                            c1 = n_chan
                        _block_moments(x, k * block, c1, units + n_chan, lanes, units, per_run)
                        for c in range(k * block, c1):
                            _finish_train(c, units[c], count, eps, momentum, w, b, rm, rv, sm, si,
                                          hi, sc, sh)
                        for n in range(n_batch):
                            _planes_affine(&x[n, k * block, 0], &y[n, k * block, 0], s,
                                           c1 - k * block, hi + k * block, sc + k * block,
                                           sh + k * block, nt)
                    if nt:
                        _stream_fence()
            else:
                _outer_moments(x, units + n_chan, units, per_run, num_threads)
                for c in range(n_chan):
                    _finish_train(c, units[c], count, eps, momentum, w, b, rm, rv, sm, si, hi,
                                  sc, sh)
                _outer_planes(NULL, &x[0, 0, 0], &y[0, 0, 0], n_batch, n_chan, s, hi, sc, sh,
                              NULL, nt, num_threads)
    finally:
        _free(coef)
        _free(units)
        _free(lanes)


def affine_outer(const floating[:, :, ::1] x, floating[:, :, ::1] y,
                 const floating[::1] hi, const floating[::1] scale,
                 const floating[::1] shift, int num_threads):
    """``y[n, c, :] = (x[n, c, :] - hi[c]) * scale[c] + shift[c]``."""
    cdef bint nt = _streams(2 * x.shape[0] * x.shape[1] * x.shape[2] * sizeof(floating),
                           STREAM_OUTER)
    with nogil:
        _outer_planes(NULL, &x[0, 0, 0], &y[0, 0, 0], x.shape[0], x.shape[1], x.shape[2],
                      &hi[0], &scale[0], &shift[0], NULL, nt, num_threads)


def forward_eval_outer(const floating[:, :, ::1] x, floating[:, :, ::1] y,
                       const floating[::1] weight, const floating[::1] bias,
                       const floating[::1] running_mean, const floating[::1] running_var,
                       double eps, int num_threads):
    """Eval-mode normalization of ``x`` (N, C, S) with the running statistics."""
    cdef Py_ssize_t n_chan = x.shape[1]
    cdef const floating* w = _opt(weight)
    cdef const floating* b = _opt(bias)
    cdef bint nt = _streams(2 * x.shape[0] * n_chan * x.shape[2] * sizeof(floating),
                           STREAM_OUTER)
    cdef floating* coef = <floating*> _alloc(3 * n_chan * sizeof(floating))
    try:
        with nogil:
            _eval_coefs(n_chan, w, b, &running_mean[0], &running_var[0],
                        eps, coef, coef + n_chan, coef + 2 * n_chan)
            _outer_planes(NULL, &x[0, 0, 0], &y[0, 0, 0], x.shape[0], n_chan, x.shape[2],
                          coef, coef + n_chan, coef + 2 * n_chan, NULL, nt, num_threads)
    finally:
        _free(coef)


def backward_outer(const floating[:, :, ::1] dy, const floating[:, :, ::1] x,
                   floating[:, :, ::1] gx, const floating[::1] weight,
                   const floating[::1] center, const double[::1] invstd, bint training,
                   floating[::1] grad_weight, floating[::1] grad_bias, int num_threads):
    """grad_input (and grad_weight/grad_bias when given) for ``x`` (N, C, S).

    ``center`` is the saved mean (training) or the running mean (eval);
    ``invstd`` is float64.
    """
    cdef Py_ssize_t n_batch = x.shape[0], n_chan = x.shape[1], s = x.shape[2]
    cdef Py_ssize_t planes = n_batch * n_chan, c, n
    cdef double count = <double> (n_batch * s)
    cdef const floating* w = _opt(weight)
    cdef floating* gw = _opt_mut(grad_weight)
    cdef floating* gb = _opt_mut(grad_bias)
    cdef double* ctr = NULL
    cdef bint need_sums = training or gw != NULL
    cdef floating* coef = NULL
    cdef floating* hi
    cdef floating* ak
    cdef floating* mk
    cdef floating* k
    cdef GradSums* units = NULL
    cdef double* lanes = NULL
    cdef GradSums zero
    cdef Py_ssize_t block = _channel_block(n_chan, 3 * n_batch * s * sizeof(floating),
                                           num_threads)
    cdef Py_ssize_t blocks = (n_chan + block - 1) // block if block else 0, kb, c1
    cdef bint nt = _streams(3 * planes * s * sizeof(floating), STREAM_OUTER)
    zero.dy = 0
    zero.dyx = 0
    zero.x = 0
    try:
        ctr = <double*> _alloc(n_chan * sizeof(double))
        for c in range(n_chan):
            ctr[c] = center[c]
        coef = <floating*> _alloc(4 * n_chan * sizeof(floating))
        hi = coef
        ak = coef + n_chan
        mk = coef + 2 * n_chan
        k = coef + 3 * n_chan
        units = <GradSums*> _alloc((_n_groups(n_batch, s) + 1) * n_chan * sizeof(GradSums))
        if block and need_sums:
            lanes = <double*> _alloc(n_chan * GRAD_LANES * sizeof(double))
        with nogil:
            if block:
                with parallel(num_threads=num_threads):
                    for kb in prange(blocks, schedule="dynamic"):
                        c1 = (kb + 1) * block
                        if c1 > n_chan:
                            c1 = n_chan
                        if need_sums:
                            _block_grad_sums(dy, x, ctr, kb * block, c1, lanes, units)
                        for c in range(kb * block, c1):
                            _finish_backward(c, units[c] if need_sums else zero, ctr[c],
                                             invstd[c], count, training, w, gw, gb, hi, ak, mk,
                                             k)
                        c = kb * block
                        for n in range(n_batch):
                            _planes_grad_input(&dy[n, c, 0], &x[n, c, 0], &gx[n, c, 0], s,
                                               c1 - c, hi + c, ak + c, mk + c, k + c, nt)
                    if nt:
                        _stream_fence()
            else:
                if need_sums:
                    _outer_grad_sums(dy, x, ctr, units + n_chan, units, num_threads)
                for c in range(n_chan):
                    _finish_backward(c, units[c] if need_sums else zero, ctr[c], invstd[c],
                                     count, training, w, gw, gb, hi, ak, mk, k)
                _outer_planes(&dy[0, 0, 0], &x[0, 0, 0], &gx[0, 0, 0], n_batch, n_chan, s, hi,
                              ak, mk, k, nt, num_threads)
    finally:
        _free(ctr)
        _free(coef)
        _free(units)
        _free(lanes)


def moments_outer(const floating[:, :, ::1] x, double[::1] mean, double[::1] m2,
                  int num_threads):
    """Per-channel mean and M2 of ``x`` (N, C, S), N * S >= 1."""
    cdef Py_ssize_t n_chan = x.shape[1], c
    cdef Moments* units = <Moments*> _alloc((_n_groups(x.shape[0], x.shape[2]) + 1) * n_chan
                                            * sizeof(Moments))
    try:
        with nogil:
            _outer_moments(x, units + n_chan, units, _per_run_moments(&x[0, 0, 0], x.shape[2],
                                                                      _f32_partials),
                           num_threads)
            for c in range(n_chan):
                mean[c] = units[c].mean
                m2[c] = units[c].m2
    finally:
        _free(units)


def grad_sums_outer(const floating[:, :, ::1] dy, const floating[:, :, ::1] x,
                    const double[::1] center, double[:, ::1] out, int num_threads):
    """``out[:, c] = [sum dy, sum dy * (x - center[c]), sum (x - center[c])]`` for (N, C, S)."""
    cdef Py_ssize_t n_chan = x.shape[1], c
    cdef GradSums* units = <GradSums*> _alloc((_n_groups(x.shape[0], x.shape[2]) + 1) * n_chan
                                              * sizeof(GradSums))
    try:
        with nogil:
            _outer_grad_sums(dy, x, &center[0], units + n_chan, units, num_threads)
            for c in range(n_chan):
                out[0, c] = units[c].dy
                out[1, c] = units[c].dyx
                out[2, c] = units[c].x
    finally:
        _free(units)


def grad_input_outer(const floating[:, :, ::1] dy, const floating[:, :, ::1] x,
                     floating[:, :, ::1] gx, const floating[:, ::1] coef, int num_threads):
    """``gx = dy * k - ((x - hi) * ak + mk)`` with ``coef = [hi, ak, mk, k]`` of shape (4, C)."""
    cdef bint nt = _streams(3 * x.shape[0] * x.shape[1] * x.shape[2] * sizeof(floating),
                           STREAM_OUTER)
    with nogil:
        _outer_planes(&dy[0, 0, 0], &x[0, 0, 0], &gx[0, 0, 0], x.shape[0], x.shape[1],
                      x.shape[2], &coef[0, 0], &coef[1, 0], &coef[2, 0], &coef[3, 0], nt,
                      num_threads)


# ---------------------------------------------------------------------------
# channel-inner layout: (M, C), rows folded into (M // k, k * C) plus a tail
# ---------------------------------------------------------------------------

ctypedef struct Blocks:
    # Fixed decomposition of an (M, C) array into blocks of folded rows plus a tail.
    Py_ssize_t n_chan
    Py_ssize_t width            # P = fold * C values in a folded row
    Py_ssize_t body_rows        # folded rows (M // fold)
    Py_ssize_t tail             # leftover original rows (< fold), handled last
    Py_ssize_t rows_per_block
    Py_ssize_t blocks


cdef inline Py_ssize_t _rows_of_16(Py_ssize_t n_chan, Py_ssize_t target) noexcept nogil:
    """The fewest rows of ``n_chan`` values that make at least ``target`` values and a
    multiple of 16 (aligned SIMD rows)."""
    cdef Py_ssize_t g = n_chan, t = 16, step
    while t:
        g, t = t, g % t
    step = 16 // g
    return step * ((target + step * n_chan - 1) // (step * n_chan))


cdef Blocks _blocks(Py_ssize_t m, Py_ssize_t n_chan) noexcept nogil:
    cdef Blocks bl
    cdef Py_ssize_t fold = 1, t
    cdef Py_ssize_t by_size, by_count, by_target
    if n_chan < FOLD_TARGET:
        fold = _rows_of_16(n_chan, FOLD_TARGET)
    bl.n_chan = n_chan
    bl.width = fold * n_chan
    bl.body_rows = m // fold
    bl.tail = m - bl.body_rows * fold
    by_size = (MIN_BLOCK_VALUES + bl.width - 1) // bl.width
    by_count = (bl.body_rows + MAX_BLOCKS - 1) // MAX_BLOCKS
    by_target = (BLOCK_VALUES + bl.width - 1) // bl.width
    t = (bl.body_rows + TARGET_BLOCKS - 1) // TARGET_BLOCKS
    if t < by_target:
        by_target = t
    bl.rows_per_block = max(by_size, by_count, by_target, MIN_BLOCK_ROWS)
    bl.blocks = (bl.body_rows + bl.rows_per_block - 1) // bl.rows_per_block
    if bl.blocks > TARGET_BLOCKS and bl.blocks % TARGET_BLOCKS:
        # a multiple of TARGET_BLOCKS blocks shares out evenly over 2, 4 or 8 threads,
        # unless that would take the blocks under MIN_BLOCK_ROWS rows
        t = (bl.blocks + TARGET_BLOCKS - 1) // TARGET_BLOCKS * TARGET_BLOCKS
        t = (bl.body_rows + t - 1) // t
        if t >= MIN_BLOCK_ROWS:
            bl.rows_per_block = t
            bl.blocks = (bl.body_rows + bl.rows_per_block - 1) // bl.rows_per_block
    return bl


# Block bounds are returned by value and assigned in the loop body: inside a prange
# that makes them private to the thread (written through a pointer, they would be
# shared between threads).
cdef inline Py_ssize_t _block_end(Blocks bl, Py_ssize_t blk) noexcept nogil:
    cdef Py_ssize_t end = (blk + 1) * bl.rows_per_block
    return end if end < bl.body_rows else bl.body_rows


cdef inline void _rows_moments(const floating* base, Py_ssize_t width, Py_ssize_t r0,
                               Py_ssize_t r1, double* su, double* sq,
                               const double* shift, double* local,
                               bint partials) noexcept nogil:
    """Column sums of ``x - shift`` and its square over rows [r0, r1); ``local`` is
    scratch of ``width`` doubles for the float32 partials (see _kernels.h).

    Fewer than F32P_MIN_ROWS rows take the float64 kernel: a column of a few values
    often fails the partials' check (its mean is far from the channel's shift in
    standard deviations of so few values) and is summed again; (32, 128) float32
    moments took 9.3 us with the partials and 4.3 us without (4 folded rows).
    """
    if floating is float:
        if partials and r1 - r0 >= F32P_MIN_ROWS:
            rows_moments_f32p(base, width, r0, r1, su, sq, shift, local)
        else:
            rows_moments_f32(base, width, r0, r1, su, sq, shift)
    else:
        rows_moments_f64(base, width, r0, r1, su, sq, shift)


cdef void _sum_blocks(const double* part, Py_ssize_t blocks, Py_ssize_t stride,
                      Py_ssize_t width, double* out) noexcept nogil:
    """``out[j] = sum over blk (in order) of part[blk * stride + j]``.

    Row by row, so that the reads are sequential: summing one column at a time
    reads with a stride of a whole block and missed the L1 on every value.
    """
    cdef Py_ssize_t blk, j
    cdef const double* row
    for j in range(width):
        out[j] = 0
    for blk in range(blocks):
        row = part + blk * stride
        for j in range(width):
            out[j] = out[j] + row[j]


cdef inline Moments _inner_channel(Blocks bl, Py_ssize_t c, const double* tot,
                                   const double* squares, const double* tail_su,
                                   const double* tail_sq, const double* shift) noexcept nogil:
    """Channel c: its folded columns (sums over all blocks), then the tail.

    Every block, every folded column of a channel and the tail sum around the
    channel's one shift (_pilot_rows), so all the partial sums add up plainly.
    """
    cdef Py_ssize_t n_chan = bl.n_chan, fold = bl.width // n_chan, f, j
    cdef double su = 0, sq = 0
    if bl.body_rows > 0:
        for f in range(fold):
            j = c + f * n_chan
            su = su + tot[j]
            sq = sq + squares[j]
    if bl.tail > 0:
        su = su + tail_su[c]
        sq = sq + tail_sq[c]
    return _group_moments(su, sq, shift[c], <double> (bl.body_rows * fold + bl.tail))


cdef void _pilot_rows(const floating* rows, Py_ssize_t width, Py_ssize_t n_chan, Py_ssize_t n,
                      double* out) noexcept nogil:
    """Per channel, the mean of its values in 16 (or n) of the n rows of ``width``
    values, the rows spread evenly, rounded to the input's type and tiled over the row.

    The shifts of the channel-inner sums: the float32 partials (_kernels.h, whose
    fastbn_pilot_f32 does the same for the channel-outer runs) need them within
    about a standard deviation of the mean, and they must be values of the
    input's type. Spread over the rows, so that the first rows (the first
    image's first pixels) do not decide alone; row by row, so that the loops run
    along memory (column by column, strided and with a division per value, the
    pilots made the row moments 1.5-1.8x slower). One shift per channel, not per
    folded column, so that the columns' sums add up without a merge formula.
    """
    cdef Py_ssize_t k = n if n < 16 else 16, fold = width // n_chan, i, j, f
    cdef const floating* row
    # each value scaled before it is added, so that the sum of 16 * fold float64
    # values near the top of the range cannot overflow
    cdef double inv = 1.0 / <double> (k * fold)
    for j in range(width):
        out[j] = 0
    for i in range(k):
        row = rows + (i * n // k) * width
        for j in range(width):
            out[j] = out[j] + <double> row[j] * inv
    for f in range(1, fold):
        for j in range(n_chan):
            out[j] = out[j] + out[f * n_chan + j]
    for j in range(n_chan):
        out[j] = <double> <floating> out[j]
    _tile_f64(out, n_chan, width)


cdef void _inner_moments(const floating* base, Blocks bl, double* scratch, double* mean,
                         double* m2, bint partials, int num_threads) noexcept nogil:
    """Per-channel mean and M2 of an (M, C) array; ``scratch``: _moments_scratch(bl).

    Sums are taken around one shift per channel, the _pilot_rows of the folded
    rows (of the tail rows when there is no folded row). With
    float64 sums the cancellation in ``sq - tot**2 / n`` costs at most about
    ``n * 1e-16`` of M2 relative, even when those rows hold an outlier: an
    outlier far from the mean also makes M2 itself large. The float32 partials
    check the cancellation per block and column and sum again (around the
    block's own mean, or in float64) where it is too large (see _kernels.h).
    """
    cdef Py_ssize_t n_chan = bl.n_chan, width = bl.width
    cdef Py_ssize_t groups = bl.blocks + 1, blk, c
    cdef double* shift = scratch
    cdef double* su = scratch + width
    cdef double* sq = su + groups * width
    cdef double* tot = sq + groups * width
    cdef double* squares = tot + width
    cdef double* local = squares + width
    cdef const floating* tail = base + bl.body_rows * width
    cdef Moments mo
    if bl.body_rows > 0:
        _pilot_rows(base, width, n_chan, bl.body_rows, shift)
    else:
        _pilot_rows(tail, n_chan, n_chan, bl.tail, shift)
    if num_threads > 1:
        for blk in prange(bl.blocks, schedule="static", num_threads=num_threads):
            _rows_moments(base, width, blk * bl.rows_per_block, _block_end(bl, blk),
                          &su[blk * width], &sq[blk * width], shift, &local[blk * width],
                          partials)
    else:
        for blk in range(bl.blocks):         # no parallel region (see SERIAL)
            _rows_moments(base, width, blk * bl.rows_per_block, _block_end(bl, blk),
                          &su[blk * width], &sq[blk * width], shift, &local[blk * width],
                          partials)
    if bl.tail > 0:
        _rows_moments(tail, n_chan, 0, bl.tail, &su[bl.blocks * width],
                      &sq[bl.blocks * width], shift, &local[bl.blocks * width], partials)
    _sum_blocks(su, bl.blocks, width, width, tot)
    _sum_blocks(sq, bl.blocks, width, width, squares)
    for c in range(n_chan):
        mo = _inner_channel(bl, c, tot, squares, su + bl.blocks * width,
                            sq + bl.blocks * width, shift)
        mean[c] = mo.mean
        m2[c] = mo.m2


cdef double* _moments_scratch(Blocks bl) except NULL:
    """shift, per-group sums and squares, their totals, per-group scratch for the
    float32 partials: (3 * (blocks + 1) + 3) * P doubles."""
    return <double*> _alloc((3 * (bl.blocks + 1) + 3) * bl.width * sizeof(double))


cdef double* _grad_scratch(Blocks bl) except NULL:
    """Per-group [dy | dy*(x-c) | x-c] sums and their three totals."""
    return <double*> _alloc((3 * (bl.blocks + 1) + 3) * bl.width * sizeof(double))


cdef inline void _tile_bytes(char* a, size_t lead, size_t total) noexcept nogil:
    """Repeat the first ``lead`` bytes of ``a`` over its first ``total`` bytes.

    By doubling copies: the plain loop ``a[j] = a[j - C]`` waits on its own store
    every C values, and for the stem's C = 3 (or C = 1) that chain cost more than
    the rest of a small call.
    """
    cdef size_t k = lead
    while 0 < k < total:
        memcpy(a + k, a, k if 2 * k <= total else total - k)
        k = 2 * k


cdef inline void _tile(floating* a, Py_ssize_t n_chan, Py_ssize_t width) noexcept nogil:
    """Repeat a[0:C] over a[0:P] (coefficients for a folded row)."""
    _tile_bytes(<char*> a, n_chan * sizeof(floating), width * sizeof(floating))


cdef inline void _tile_f64(double* a, Py_ssize_t n_chan, Py_ssize_t width) noexcept nogil:
    """:func:`_tile` for the float64 centers (not fused: callers are fused over floating)."""
    _tile_bytes(<char*> a, n_chan * sizeof(double), width * sizeof(double))


def forward_train_inner(const floating[:, ::1] x, floating[:, ::1] y,
                        const floating[::1] weight, const floating[::1] bias,
                        floating[::1] running_mean, floating[::1] running_var,
                        floating[::1] save_mean, floating[::1] save_invstd,
                        double momentum, double eps, int num_threads):
    """Channel-inner version of :func:`forward_train_outer` for ``(M, C)`` views."""
    cdef Py_ssize_t m = x.shape[0], n_chan = x.shape[1], c
    cdef Blocks bl = _blocks(m, n_chan)
    cdef Py_ssize_t width = bl.width
    cdef const floating* w = _opt(weight)
    cdef const floating* b = _opt(bias)
    cdef floating* rm = _opt_mut(running_mean)
    cdef floating* rv = _opt_mut(running_var)
    cdef double* scratch = _moments_scratch(bl)
    cdef double* stats = NULL
    cdef floating* coef = NULL
    cdef Moments mo
    try:
        stats = <double*> _alloc(2 * n_chan * sizeof(double))
        coef = <floating*> _alloc(3 * width * sizeof(floating))
        with nogil:
            _inner_moments(&x[0, 0], bl, scratch, stats, stats + n_chan, _f32_partials,
                           num_threads)
            for c in range(n_chan):
                mo.mean = stats[c]
                mo.m2 = stats[n_chan + c]
                _finish_train(c, mo, <double> m, eps, momentum, w, b, rm, rv, &save_mean[0],
                              &save_invstd[0], coef, coef + width, coef + 2 * width)
            for c in range(3):
                _tile(coef + c * width, n_chan, width)
            _inner_affine(&x[0, 0], &y[0, 0], bl, coef, coef + width, coef + 2 * width,
                          STREAM_INNER_REREAD, num_threads)
    finally:
        _free(scratch)
        _free(stats)
        _free(coef)


def moments_inner(const floating[:, ::1] x, double[::1] mean, double[::1] m2,
                  int num_threads):
    """Per-channel mean and M2 (sum of squared deviations) of ``x`` (M, C), M >= 1."""
    cdef Blocks bl = _blocks(x.shape[0], x.shape[1])
    cdef double* scratch = _moments_scratch(bl)
    try:
        with nogil:
            _inner_moments(&x[0, 0], bl, scratch, &mean[0], &m2[0], _f32_partials, num_threads)
    finally:
        _free(scratch)


cdef void _inner_affine(const floating* x, floating* y, Blocks bl, const floating* hi,
                        const floating* sc, const floating* sh, int eighths,
                        int num_threads) noexcept nogil:
    """``y = (x - hi) * sc + sh`` over an (M, C) array (coefficients tiled to P).

    ``eighths``: where streaming starts (see _streams).
    """
    cdef Py_ssize_t total = bl.body_rows * bl.width + bl.tail * bl.n_chan, r
    cdef Py_ssize_t width = bl.width, rows = bl.body_rows
    cdef bint nt = _streams(2 * total * sizeof(floating), eighths)
    for r in range(width):
        if hi[r] != 0:
            break
    else:
        hi = NULL    # every channel takes the one multiply-add form
    _inner_rows(<const floating*> NULL, x, y, width, rows, hi, sc, sh,
                <const floating*> NULL, nt, num_threads)
    r = rows * width
    _rows_affine(x + r, y + r, total - r, hi, sc, sh, nt)
    if nt:
        _stream_fence()


cdef void _inner_rows(const floating* dy, const floating* x, floating* out,
                      Py_ssize_t width, Py_ssize_t rows, const floating* hi,
                      const floating* a, const floating* b, const floating* k, bint nt,
                      int num_threads) noexcept nogil:
    """Row loop of the channel-inner elementwise passes over ``rows`` rows of ``width``
    values (coefficients tiled over a row): ``dy`` NULL: ``out = (x - hi) * a + b``,
    else grad_input with a = ak, b = mk and ``k`` (as _outer_planes for channel-outer)."""
    cdef Py_ssize_t r
    if nt:
        with parallel(num_threads=num_threads):
            for r in prange(rows, schedule="static"):
                _inner_row(dy, x, out, r * width, width, hi, a, b, k, True)
            _stream_fence()
    elif num_threads > 1:
        # the plain loop: the parallel block measured ~8 us slower on the small stem rows
        for r in prange(rows, schedule="static", num_threads=num_threads):
            _inner_row(dy, x, out, r * width, width, hi, a, b, k, False)
    else:
        for r in range(rows):                # no parallel region (see SERIAL)
            _inner_row(dy, x, out, r * width, width, hi, a, b, k, False)


cdef inline void _inner_row(const floating* dy, const floating* x, floating* out,
                            Py_ssize_t off, Py_ssize_t n, const floating* hi,
                            const floating* a, const floating* b, const floating* k,
                            bint nt) noexcept nogil:
    if dy == NULL:
        _rows_affine(x + off, out + off, n, hi, a, b, nt)
    else:
        _rows_grad_input(dy, x, out, off, n, hi, a, b, k, nt)


# Rows of the channel-inner grad_input pass hold about GRAD_INPUT_ROW values, not the
# FOLD_TARGET of the reductions: the pass keeps three or four tiled coefficient rows
# in the L1 next to its dy, x and gx streams, and rows of 4 KiB (1024 floats) left too
# little room for them. (100352, 64) float32 grad_input took 0.55-0.63x the time with
# rows of 512 values instead of 1024 (256: 0.53-0.72x, 128 and 64: worse; the row
# length switched in alternating rounds, 2 threads), and 0.76x in an A/B of the two
# builds ((25088, 64) 0.77x, (512, 256) 0.80x). The eval pass, with one stream and one
# coefficient row less, showed no such gain and keeps the folded rows.
cdef Py_ssize_t GRAD_INPUT_ROW = 512


cdef inline Py_ssize_t _grad_input_width(Py_ssize_t n_chan, Py_ssize_t width) noexcept nogil:
    """Row length of the channel-inner grad_input pass: the fewest whole channel rows
    that make at least GRAD_INPUT_ROW values and a multiple of 16, or the folded row
    of _blocks (``width``, over which the callers tile the coefficients) where that is
    no longer. Odd C from 257 up needs 16 rows for a multiple of 16: it keeps the
    folded row, as every C >= 1024 does (rows of C values)."""
    cdef Py_ssize_t rows = _rows_of_16(n_chan, GRAD_INPUT_ROW) * n_chan
    return rows if rows < width else width


def grad_input_width(Py_ssize_t m, Py_ssize_t n_chan):
    """Row length of the channel-inner grad_input pass for (m, n_chan) (for tests)."""
    return _grad_input_width(n_chan, _blocks(m, n_chan).width)


cdef inline void _rows_affine(const floating* x, floating* y, Py_ssize_t n,
                              const floating* hi, const floating* sc,
                              const floating* sh, bint nt) noexcept nogil:
    if floating is float:
        rows_affine_f32(x, y, n, hi, sc, sh, nt)
    else:
        rows_affine_f64(x, y, n, hi, sc, sh, nt)


def forward_eval_inner(const floating[:, ::1] x, floating[:, ::1] y,
                       const floating[::1] weight, const floating[::1] bias,
                       const floating[::1] running_mean, const floating[::1] running_var,
                       double eps, int num_threads):
    """Eval-mode normalization of ``x`` (M, C) with the running statistics."""
    cdef Py_ssize_t n_chan = x.shape[1], c
    cdef Blocks bl = _blocks(x.shape[0], n_chan)
    cdef Py_ssize_t width = bl.width
    cdef const floating* w = _opt(weight)
    cdef const floating* b = _opt(bias)
    cdef floating* coef = <floating*> _alloc(3 * width * sizeof(floating))
    try:
        with nogil:
            _eval_coefs(n_chan, w, b, &running_mean[0], &running_var[0],
                        eps, coef, coef + width, coef + 2 * width)
            for c in range(3):
                _tile(coef + c * width, n_chan, width)
            _inner_affine(&x[0, 0], &y[0, 0], bl, coef, coef + width, coef + 2 * width,
                          STREAM_INNER, num_threads)
    finally:
        _free(coef)


def affine_inner(const floating[:, ::1] x, floating[:, ::1] y,
                 const floating[::1] hi, const floating[::1] scale,
                 const floating[::1] shift, int num_threads):
    """``y[r, c] = (x[r, c] - hi[c]) * scale[c] + shift[c]``."""
    cdef Py_ssize_t n_chan = x.shape[1], j
    cdef Blocks bl = _blocks(x.shape[0], n_chan)
    cdef floating* coef = <floating*> _alloc(3 * bl.width * sizeof(floating))
    try:
        with nogil:
            for j in range(n_chan):
                coef[j] = hi[j]
                coef[bl.width + j] = scale[j]
                coef[2 * bl.width + j] = shift[j]
            for j in range(3):
                _tile(coef + j * bl.width, n_chan, bl.width)
            _inner_affine(&x[0, 0], &y[0, 0], bl, coef, coef + bl.width,
                          coef + 2 * bl.width, STREAM_INNER, num_threads)
    finally:
        _free(coef)


cdef inline void _rows_grad_sums(const floating* dy, const floating* x, Py_ssize_t width,
                                 Py_ssize_t r0, Py_ssize_t r1, const double* center,
                                 double* out) noexcept nogil:
    if floating is float:
        rows_grad_sums_f32(dy, x, width, r0, r1, center, out)
    else:
        rows_grad_sums_f64(dy, x, width, r0, r1, center, out)


cdef inline GradSums _inner_channel_sums(Blocks bl, Py_ssize_t c, const double* totals,
                                        const double* tail) noexcept nogil:
    """Channel c's sums: its folded columns' totals over all blocks, in order, then the tail."""
    cdef Py_ssize_t n_chan = bl.n_chan, width = bl.width, fold = width // n_chan
    cdef Py_ssize_t f, j
    cdef GradSums acc
    acc.dy = 0
    acc.dyx = 0
    acc.x = 0
    for f in range(fold):
        j = c + f * n_chan
        acc.dy += totals[j]
        acc.dyx += totals[width + j]
        acc.x += totals[2 * width + j]
    if bl.tail > 0:
        acc.dy += tail[c]
        acc.dyx += tail[n_chan + c]
        acc.x += tail[2 * n_chan + c]
    return acc


cdef void _inner_grad_sums(const floating* pdy, const floating* px, Blocks bl,
                           const double* ctr, double* part, GradSums* out,
                           int num_threads) noexcept nogil:
    """Per-channel GradSums of (M, C) arrays around ``ctr`` (the center tiled over P)."""
    cdef Py_ssize_t n_chan = bl.n_chan, width = bl.width
    cdef Py_ssize_t off = bl.body_rows * width, blk, c
    if num_threads > 1:
        for blk in prange(bl.blocks, schedule="static", num_threads=num_threads):
            _rows_grad_sums(pdy, px, width, blk * bl.rows_per_block, _block_end(bl, blk),
                            ctr, &part[3 * blk * width])
    else:
        for blk in range(bl.blocks):         # no parallel region (see SERIAL)
            _rows_grad_sums(pdy, px, width, blk * bl.rows_per_block, _block_end(bl, blk),
                            ctr, &part[3 * blk * width])
    if bl.tail > 0:
        _rows_grad_sums(pdy + off, px + off, n_chan, 0, bl.tail, ctr,
                        &part[3 * bl.blocks * width])
    cdef double* totals = part + 3 * (bl.blocks + 1) * width
    for c in range(3):
        _sum_blocks(part + c * width, bl.blocks, 3 * width, width, totals + c * width)
    for c in range(n_chan):
        out[c] = _inner_channel_sums(bl, c, totals, part + 3 * bl.blocks * width)


cdef void _inner_grad_input(const floating* pdy, const floating* px, floating* pgx,
                            Blocks bl, const floating* coef, int eighths,
                            int num_threads) noexcept nogil:
    """grad_input over an (M, C) array; ``coef`` = [hi | ak | mk | k], each tiled to P.

    ``eighths``: where streaming starts (see _streams).
    """
    cdef Py_ssize_t total = bl.body_rows * bl.width + bl.tail * bl.n_chan, i
    cdef Py_ssize_t width = _grad_input_width(bl.n_chan, bl.width), rows = total // width
    cdef const floating* hi = coef
    cdef const floating* ak = coef + bl.width
    cdef const floating* mk = coef + 2 * bl.width
    cdef const floating* k = coef + 3 * bl.width
    cdef bint nt = _streams(3 * total * sizeof(floating), eighths)
    for i in range(width):
        if hi[i] != 0 or ak[i] != 0 or mk[i] != 0:
            break
    else:
        # dy * k (eval): read dy only, as _planes_grad_input does
        _inner_affine(pdy, pgx, bl, hi, k, ak, eighths, num_threads)
        return
    for i in range(width):
        if hi[i] != 0:
            break
    else:
        hi = NULL    # every channel takes the form without the subtraction
    _inner_rows(pdy, px, pgx, width, rows, hi, ak, mk, k, nt, num_threads)
    _rows_grad_input(pdy, px, pgx, rows * width, total - rows * width, hi, ak, mk, k, nt)
    if nt:
        _stream_fence()


def backward_inner(const floating[:, ::1] dy, const floating[:, ::1] x,
                   floating[:, ::1] gx, const floating[::1] weight,
                   const floating[::1] center, const double[::1] invstd, bint training,
                   floating[::1] grad_weight, floating[::1] grad_bias, int num_threads):
    """Channel-inner version of :func:`backward_outer` for ``(M, C)`` views."""
    cdef Py_ssize_t m = x.shape[0], n_chan = x.shape[1], c, j
    cdef Blocks bl = _blocks(m, n_chan)
    cdef Py_ssize_t width = bl.width
    cdef const floating* w = _opt(weight)
    cdef floating* gw = _opt_mut(grad_weight)
    cdef floating* gb = _opt_mut(grad_bias)
    cdef bint need_sums = training or gw != NULL
    cdef double* part = _grad_scratch(bl)
    cdef double* ctr = NULL
    cdef GradSums* sums = NULL
    cdef floating* coef = NULL
    try:
        ctr = <double*> _alloc(width * sizeof(double))
        sums = <GradSums*> _alloc(n_chan * sizeof(GradSums))
        coef = <floating*> _alloc(4 * width * sizeof(floating))
        with nogil:
            for j in range(n_chan):
                ctr[j] = center[j]
            _tile_f64(ctr, n_chan, width)
            if need_sums:
                _inner_grad_sums(&dy[0, 0], &x[0, 0], bl, ctr, part, sums, num_threads)
            else:
                memset(sums, 0, n_chan * sizeof(GradSums))
            for c in range(n_chan):
                _finish_backward(c, sums[c], ctr[c], invstd[c], <double> m, training, w, gw,
                                 gb, coef, coef + width, coef + 2 * width, coef + 3 * width)
            for c in range(4):
                _tile(coef + c * width, n_chan, width)
            _inner_grad_input(&dy[0, 0], &x[0, 0], &gx[0, 0], bl, coef,
                              STREAM_INNER_REREAD if need_sums else STREAM_INNER, num_threads)
    finally:
        _free(part)
        _free(ctr)
        _free(sums)
        _free(coef)


def grad_sums_inner(const floating[:, ::1] dy, const floating[:, ::1] x,
                    const double[::1] center, double[:, ::1] out, int num_threads):
    """``out[:, c] = [sum dy, sum dy * (x - center[c]), sum (x - center[c])]`` for (M, C)."""
    cdef Py_ssize_t n_chan = x.shape[1], c, j
    cdef Blocks bl = _blocks(x.shape[0], n_chan)
    cdef double* part = _grad_scratch(bl)
    cdef double* ctr = NULL
    cdef GradSums* sums = NULL
    try:
        ctr = <double*> _alloc(bl.width * sizeof(double))
        sums = <GradSums*> _alloc(n_chan * sizeof(GradSums))
        with nogil:
            for j in range(n_chan):
                ctr[j] = center[j]
            _tile_f64(ctr, n_chan, bl.width)
            _inner_grad_sums(&dy[0, 0], &x[0, 0], bl, ctr, part, sums, num_threads)
            for c in range(n_chan):
                out[0, c] = sums[c].dy
                out[1, c] = sums[c].dyx
                out[2, c] = sums[c].x
    finally:
        _free(part)
        _free(ctr)
        _free(sums)


def grad_input_inner(const floating[:, ::1] dy, const floating[:, ::1] x,
                     floating[:, ::1] gx, const floating[:, ::1] coef, int num_threads):
    """``gx = dy * k - ((x - hi) * ak + mk)`` with ``coef = [hi, ak, mk, k]`` of shape (4, C)."""
    cdef Py_ssize_t n_chan = x.shape[1], c, j
    cdef Blocks bl = _blocks(x.shape[0], n_chan)
    cdef floating* tiled = <floating*> _alloc(4 * bl.width * sizeof(floating))
    try:
        with nogil:
            for c in range(4):
                for j in range(n_chan):
                    tiled[c * bl.width + j] = coef[c, j]
                _tile(tiled + c * bl.width, n_chan, bl.width)
            _inner_grad_input(&dy[0, 0], &x[0, 0], &gx[0, 0], bl, tiled, STREAM_INNER,
                              num_threads)
    finally:
        _free(tiled)


cdef inline void _rows_grad_input(const floating* dy, const floating* x, floating* gx,
                                  Py_ssize_t off, Py_ssize_t n, const floating* hi,
                                  const floating* ak, const floating* mk,
                                  const floating* k, bint nt) noexcept nogil:
    if floating is float:
        rows_grad_input_f32(dy + off, x + off, gx + off, n, hi, ak, mk, k, nt)
    else:
        rows_grad_input_f64(dy + off, x + off, gx + off, n, hi, ak, mk, k, nt)


# ---------------------------------------------------------------------------
# memory bandwidth probe for the benchmark
# ---------------------------------------------------------------------------

def stream_copy(const double[::1] src, double[::1] dst, int num_threads):
    """``dst[:] = src`` split in contiguous pieces over threads (STREAM 'copy')."""
    cdef Py_ssize_t n = src.shape[0], piece = 1 << 16
    cdef Py_ssize_t blocks = (n + piece - 1) // piece, b, i, i1
    with nogil:
        for b in prange(blocks, schedule="static", num_threads=num_threads):
            i1 = (b + 1) * piece
            if i1 > n:
                i1 = n
            for i in range(b * piece, i1):
                dst[i] = src[i]
