# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""OpenMP kernels for batch normalization on NumPy arrays.

Two memory layouts, each with its own kernels (the layout is chosen in Python,
see ``fastbn/_layout.py``):

* channel-outer, ``x`` seen as ``(N, C, S)`` with ``S`` contiguous (NCHW, NCDHW,
  ``(N, C, L)``); the unit of work is one ``(n, c)`` plane of ``S`` values.
* channel-inner, ``x`` seen as ``(M, C)`` with ``C`` contiguous (channels-last,
  2-D ``(N, C)``); the unit of work is a fixed-size block of rows.

Determinism: every unit of work produces partial results into its own slot of a
scratch buffer, and the partials are merged in a fixed order afterwards. The
decomposition depends only on the shape, never on the number of threads, so the
results are bit-identical for any thread count.

Accuracy: statistics are accumulated in float64 around a shift (the first value
of each plane or block), which keeps the variance exact for data with a large
mean. Elementwise passes subtract the mean as a float64 value split into two
numbers of the input's type (``hi + lo``), so ``x - mean`` keeps full precision
even when ``|mean|`` is 1e6 times the standard deviation.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.stdlib cimport malloc, free
from libc.string cimport memset

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

# Rows per block for the channel-inner layout: a fixed function of the shape
# only, so the merge order never depends on the thread count.
cdef Py_ssize_t MAX_BLOCKS = 64
cdef Py_ssize_t MIN_BLOCK_ROWS = 16


def omp_max_threads():
    """Number of threads OpenMP would use by default (1 without OpenMP)."""
    return omp_get_max_threads()


cdef inline Py_ssize_t _block_rows(Py_ssize_t m) noexcept nogil:
    cdef Py_ssize_t rows = (m + MAX_BLOCKS - 1) // MAX_BLOCKS
    if rows < MIN_BLOCK_ROWS:
        rows = MIN_BLOCK_ROWS
    return rows


cdef void* _alloc(size_t nbytes) except NULL:
    cdef void* p = malloc(nbytes if nbytes > 0 else 1)
    if p == NULL:
        raise MemoryError(f"fastbn: cannot allocate {nbytes} bytes of scratch")
    return p


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------

cdef inline void _plane_moments(const floating* p, Py_ssize_t s,
                                double* mean, double* m2) noexcept nogil:
    """Mean and sum of squared deviations of one contiguous plane."""
    cdef double shift = p[0]
    cdef double s0 = 0, s1 = 0, s2 = 0, s3 = 0
    cdef double q0 = 0, q1 = 0, q2 = 0, q3 = 0
    cdef double d0, d1, d2, d3, total, sq
    cdef Py_ssize_t i, s4 = s - s % 4
    # Four independent accumulators: lets the compiler pipeline (and pair) the
    # adds while keeping a fixed summation order.
    for i in range(0, s4, 4):
        d0 = p[i] - shift
        d1 = p[i + 1] - shift
        d2 = p[i + 2] - shift
        d3 = p[i + 3] - shift
        s0 += d0
        s1 += d1
        s2 += d2
        s3 += d3
        q0 += d0 * d0
        q1 += d1 * d1
        q2 += d2 * d2
        q3 += d3 * d3
    for i in range(s4, s):
        d0 = p[i] - shift
        s0 += d0
        q0 += d0 * d0
    total = (s0 + s1) + (s2 + s3)
    sq = (q0 + q1) + (q2 + q3)
    mean[0] = shift + total / s
    sq = sq - total * (total / s)
    m2[0] = sq if sq > 0 else 0.0


cdef inline void _chan_merge(double* mean_a, double* m2_a, double n_a,
                             double mean_b, double m2_b, double n_b) noexcept nogil:
    """Merge (n_b, mean_b, m2_b) into (n_a, mean_a, m2_a) (Chan et al.)."""
    cdef double n = n_a + n_b
    cdef double delta = mean_b - mean_a[0]
    mean_a[0] = mean_a[0] + delta * (n_b / n)
    m2_a[0] = m2_a[0] + m2_b + delta * delta * (n_a * n_b / n)


def stats_outer(const floating[:, :, ::1] x, double[::1] mean, double[::1] m2,
                int num_threads):
    """Per-channel mean and M2 (sum of squared deviations) of ``x`` (N, C, S).

    Requires N >= 1 and S >= 1.
    """
    cdef Py_ssize_t n_batch = x.shape[0], n_chan = x.shape[1], s = x.shape[2]
    cdef Py_ssize_t planes = n_batch * n_chan, k, n, c
    cdef double* pmean = <double*> _alloc(planes * sizeof(double))
    cdef double* pm2 = <double*> _alloc(planes * sizeof(double))
    cdef double acc_mean, acc_m2
    try:
        with nogil:
            for k in prange(planes, schedule="static", num_threads=num_threads):
                _plane_moments(&x[k // n_chan, k % n_chan, 0], s, &pmean[k], &pm2[k])
            for c in prange(n_chan, schedule="static", num_threads=num_threads):
                acc_mean = pmean[c]
                acc_m2 = pm2[c]
                for n in range(1, n_batch):
                    _chan_merge(&acc_mean, &acc_m2, <double> (n * s),
                                pmean[n * n_chan + c], pm2[n * n_chan + c], <double> s)
                mean[c] = acc_mean
                m2[c] = acc_m2
    finally:
        free(pmean)
        free(pm2)


def stats_inner(const floating[:, ::1] x, double[::1] mean, double[::1] m2,
                int num_threads):
    """Per-channel mean and M2 of ``x`` (M, C), C contiguous. Requires M >= 1."""
    cdef Py_ssize_t m = x.shape[0], n_chan = x.shape[1]
    cdef Py_ssize_t rows = _block_rows(m)
    cdef Py_ssize_t blocks = (m + rows - 1) // rows
    cdef Py_ssize_t b, r, r0, r1, c
    cdef double* bsum = <double*> _alloc(blocks * n_chan * sizeof(double))
    cdef double* bsq = <double*> _alloc(blocks * n_chan * sizeof(double))
    cdef double* sh
    cdef double* su
    cdef double* sq
    cdef const floating* row
    cdef double d, cnt, acc_mean, acc_m2, bmean, bm2, tot, seen
    try:
        with nogil:
            for b in prange(blocks, schedule="static", num_threads=num_threads):
                r0 = b * rows
                r1 = r0 + rows
                if r1 > m:
                    r1 = m
                su = &bsum[b * n_chan]
                sq = &bsq[b * n_chan]
                memset(su, 0, n_chan * sizeof(double))
                memset(sq, 0, n_chan * sizeof(double))
                # shift = first row of the block
                for r in range(r0 + 1, r1):
                    row = &x[r, 0]
                    for c in range(n_chan):
                        d = row[c] - <double> x[r0, c]
                        su[c] += d
                        sq[c] += d * d
            for c in prange(n_chan, schedule="static", num_threads=num_threads):
                acc_mean = 0
                acc_m2 = 0
                seen = 0
                for b in range(blocks):
                    r0 = b * rows
                    r1 = r0 + rows
                    if r1 > m:
                        r1 = m
                    cnt = <double> (r1 - r0)
                    tot = bsum[b * n_chan + c]
                    bmean = <double> x[r0, c] + tot / cnt
                    bm2 = bsq[b * n_chan + c] - tot * (tot / cnt)
                    if bm2 < 0:
                        bm2 = 0
                    if b == 0:
                        acc_mean = bmean
                        acc_m2 = bm2
                    else:
                        _chan_merge(&acc_mean, &acc_m2, seen, bmean, bm2, cnt)
                    seen = seen + cnt
                mean[c] = acc_mean
                m2[c] = acc_m2
    finally:
        free(bsum)
        free(bsq)


# ---------------------------------------------------------------------------
# elementwise: y = ((x - hi) - lo) * scale + shift
# ---------------------------------------------------------------------------

def affine_outer(const floating[:, :, ::1] x, floating[:, :, ::1] y,
                 const floating[::1] hi, const floating[::1] lo,
                 const floating[::1] scale, const floating[::1] shift,
                 int num_threads):
    """``y[n, c, :] = ((x[n, c, :] - hi[c]) - lo[c]) * scale[c] + shift[c]``."""
    cdef Py_ssize_t n_chan = x.shape[1], s = x.shape[2]
    cdef Py_ssize_t planes = x.shape[0] * n_chan, k, i, c
    cdef const floating* px
    cdef floating* py
    cdef floating h, l, a, b
    with nogil:
        for k in prange(planes, schedule="static", num_threads=num_threads):
            c = k % n_chan
            px = &x[k // n_chan, c, 0]
            py = &y[k // n_chan, c, 0]
            h = hi[c]
            l = lo[c]
            a = scale[c]
            b = shift[c]
            for i in range(s):
                py[i] = ((px[i] - h) - l) * a + b


def affine_inner(const floating[:, ::1] x, floating[:, ::1] y,
                 const floating[::1] hi, const floating[::1] lo,
                 const floating[::1] scale, const floating[::1] shift,
                 int num_threads):
    """``y[r, c] = ((x[r, c] - hi[c]) - lo[c]) * scale[c] + shift[c]``."""
    cdef Py_ssize_t m = x.shape[0], n_chan = x.shape[1], r, c
    cdef const floating* px
    cdef floating* py
    with nogil:
        for r in prange(m, schedule="static", num_threads=num_threads):
            px = &x[r, 0]
            py = &y[r, 0]
            for c in range(n_chan):
                py[c] = ((px[c] - hi[c]) - lo[c]) * scale[c] + shift[c]


# ---------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------

cdef inline void _plane_grad_sums(const floating* pdy, const floating* px, Py_ssize_t s,
                                  double center, double* out) noexcept nogil:
    """out = [sum(dy), sum(dy * (x - center)), sum(x - center)] over one plane."""
    cdef double g0 = 0, g1 = 0, p0 = 0, p1 = 0, x0 = 0, x1 = 0
    cdef double d0, d1, e0, e1
    cdef Py_ssize_t i, s2 = s - s % 2
    for i in range(0, s2, 2):
        d0 = pdy[i]
        d1 = pdy[i + 1]
        e0 = px[i] - center
        e1 = px[i + 1] - center
        g0 += d0
        g1 += d1
        p0 += d0 * e0
        p1 += d1 * e1
        x0 += e0
        x1 += e1
    for i in range(s2, s):
        d0 = pdy[i]
        e0 = px[i] - center
        g0 += d0
        p0 += d0 * e0
        x0 += e0
    out[0] = g0 + g1
    out[1] = p0 + p1
    out[2] = x0 + x1


def grad_sums_outer(const floating[:, :, ::1] dy, const floating[:, :, ::1] x,
                    const double[::1] center, double[:, ::1] out, int num_threads):
    """``out[:, c] = [sum(dy), sum(dy*(x-center[c])), sum(x-center[c])]`` over N, S."""
    cdef Py_ssize_t n_batch = x.shape[0], n_chan = x.shape[1], s = x.shape[2]
    cdef Py_ssize_t planes = n_batch * n_chan, k, n, c, j
    cdef double* part = <double*> _alloc(planes * 3 * sizeof(double))
    cdef double a0, a1, a2
    try:
        with nogil:
            for k in prange(planes, schedule="static", num_threads=num_threads):
                c = k % n_chan
                _plane_grad_sums(&dy[k // n_chan, c, 0], &x[k // n_chan, c, 0], s,
                                 center[c], &part[3 * k])
            for c in prange(n_chan, schedule="static", num_threads=num_threads):
                a0 = 0
                a1 = 0
                a2 = 0
                for n in range(n_batch):
                    j = 3 * (n * n_chan + c)
                    a0 = a0 + part[j]
                    a1 = a1 + part[j + 1]
                    a2 = a2 + part[j + 2]
                out[0, c] = a0
                out[1, c] = a1
                out[2, c] = a2
    finally:
        free(part)


def grad_sums_inner(const floating[:, ::1] dy, const floating[:, ::1] x,
                    const double[::1] center, double[:, ::1] out, int num_threads):
    """Channel-inner version of :func:`grad_sums_outer` for ``(M, C)`` views."""
    cdef Py_ssize_t m = x.shape[0], n_chan = x.shape[1]
    cdef Py_ssize_t rows = _block_rows(m)
    cdef Py_ssize_t blocks = (m + rows - 1) // rows
    cdef Py_ssize_t b, r, r1, c
    cdef double* part = <double*> _alloc(blocks * 3 * n_chan * sizeof(double))
    cdef double* g
    cdef double* p
    cdef double* q
    cdef const floating* rdy
    cdef const floating* rx
    cdef double d, e, a0, a1, a2
    try:
        with nogil:
            for b in prange(blocks, schedule="static", num_threads=num_threads):
                g = &part[3 * b * n_chan]
                p = g + n_chan
                q = p + n_chan
                memset(g, 0, 3 * n_chan * sizeof(double))
                r1 = (b + 1) * rows
                if r1 > m:
                    r1 = m
                for r in range(b * rows, r1):
                    rdy = &dy[r, 0]
                    rx = &x[r, 0]
                    for c in range(n_chan):
                        d = rdy[c]
                        e = rx[c] - center[c]
                        g[c] += d
                        p[c] += d * e
                        q[c] += e
            for c in prange(n_chan, schedule="static", num_threads=num_threads):
                a0 = 0
                a1 = 0
                a2 = 0
                for b in range(blocks):
                    a0 = a0 + part[3 * b * n_chan + c]
                    a1 = a1 + part[3 * b * n_chan + n_chan + c]
                    a2 = a2 + part[3 * b * n_chan + 2 * n_chan + c]
                out[0, c] = a0
                out[1, c] = a1
                out[2, c] = a2
    finally:
        free(part)


def grad_input_outer(const floating[:, :, ::1] dy, const floating[:, :, ::1] x,
                     floating[:, :, ::1] gx,
                     const floating[::1] hi, const floating[::1] lo,
                     const floating[::1] k, const floating[::1] mdy,
                     const floating[::1] a, int num_threads):
    """``gx = (dy - mdy[c] - ((x - hi[c]) - lo[c]) * a[c]) * k[c]`` (training backward)."""
    cdef Py_ssize_t n_chan = x.shape[1], s = x.shape[2]
    cdef Py_ssize_t planes = x.shape[0] * n_chan, p, i, c, n
    cdef const floating* pdy
    cdef const floating* px
    cdef floating* pg
    cdef floating h, l, kk, md, aa
    with nogil:
        for p in prange(planes, schedule="static", num_threads=num_threads):
            c = p % n_chan
            n = p // n_chan
            pdy = &dy[n, c, 0]
            px = &x[n, c, 0]
            pg = &gx[n, c, 0]
            h = hi[c]
            l = lo[c]
            kk = k[c]
            md = mdy[c]
            aa = a[c]
            for i in range(s):
                pg[i] = (pdy[i] - md - ((px[i] - h) - l) * aa) * kk


def grad_input_inner(const floating[:, ::1] dy, const floating[:, ::1] x,
                     floating[:, ::1] gx,
                     const floating[::1] hi, const floating[::1] lo,
                     const floating[::1] k, const floating[::1] mdy,
                     const floating[::1] a, int num_threads):
    """Channel-inner version of :func:`grad_input_outer`."""
    cdef Py_ssize_t m = x.shape[0], n_chan = x.shape[1], r, c
    cdef const floating* rdy
    cdef const floating* rx
    cdef floating* rg
    with nogil:
        for r in prange(m, schedule="static", num_threads=num_threads):
            rdy = &dy[r, 0]
            rx = &x[r, 0]
            rg = &gx[r, 0]
            for c in range(n_chan):
                rg[c] = (rdy[c] - mdy[c] - ((rx[c] - hi[c]) - lo[c]) * a[c]) * k[c]


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
