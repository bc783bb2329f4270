/*
 * Contiguous-run kernels behind fastbn/_cpu.pyx, for float and double.
 *
 * Written in C rather than Cython for one reason: `restrict`. Python extensions
 * are compiled with -fno-strict-aliasing, so without it the compiler must assume
 * that the output may overlap the inputs and the per-channel coefficient arrays,
 * and the loops below stop vectorising. Every function here works on contiguous
 * runs of values (a plane, a few planes of one channel or of one image, a block
 * of rows); the parallel loops and the fixed-order merges stay in Cython.
 *
 * Summation order: reductions use a fixed number of independent lanes (the
 * `lane` arrays, carried over the planes of a unit where the caller asks),
 * combined in a fixed tree at the end. That order depends only on the shape, so
 * results are identical whatever thread runs them, and the lanes are what lets
 * the compiler use SIMD without -ffast-math.
 */
#ifndef FASTBN_KERNELS_H
#define FASTBN_KERNELS_H

#include <float.h>
#include <stddef.h>
#include <string.h>

#if defined(_MSC_VER)
#define FASTBN_RESTRICT __restrict
#else
#define FASTBN_RESTRICT __restrict__
#endif

#define FASTBN_LANES 8

/*
 * The row reductions of the channel-inner layout read several rows in one sweep;
 * on the machines measured the hardware prefetchers did not keep up with that
 * pattern (a 4-row sweep over 512-byte rows ran at a third of the speed of the
 * same bytes read as one run), and a software prefetch about 8 KiB ahead of
 * each row restored it. Prefetches never fault, so reading past the end is fine.
 * Rows of FASTBN_WIDE_ROW bytes or more stream well on their own, and there the
 * prefetches cost 10-20% (measured for 2-8 KiB rows, 2 threads); they are skipped.
 */
#if defined(__GNUC__) || defined(__clang__)
#define FASTBN_PREFETCH(addr) __builtin_prefetch((addr), 0, 0)
#else
#define FASTBN_PREFETCH(addr) ((void)0)
#endif
#define FASTBN_PREFETCH_BYTES 8192
#define FASTBN_WIDE_ROW 2048
/* rows ahead for rows of w values of type T: about FASTBN_PREFETCH_BYTES, at least 4 */
#define FASTBN_AHEAD(T, w) \
    ((w) <= 0 ? 0 : (ptrdiff_t)(FASTBN_PREFETCH_BYTES / sizeof(T)) / (w) < 4 ? 4 \
     : (ptrdiff_t)(FASTBN_PREFETCH_BYTES / sizeof(T)) / (w))
#define FASTBN_LINE_VALUES(T) ((ptrdiff_t)(64 / sizeof(T)))

/*
 * Run-time dispatch for a portable build: each kernel is compiled for AVX-512,
 * AVX2+FMA and baseline x86-64, and the loader picks the best the CPU has
 * (GCC's target_clones, an ifunc on glibc). Results are the same for any thread
 * count on a given machine; across machines the last bits may differ (FMA).
 * FASTBN_NO_DISPATCH turns it off.
 */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) \
    && defined(__linux__) && !defined(FASTBN_NO_DISPATCH)
#define FASTBN_KERNEL static __attribute__((noinline, target_clones( \
    "arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTBN_KERNEL static inline
#endif

/*
 * Streaming (non-temporal) output stores, for calls that move more bytes than
 * the L3 holds (the caller decides, see _streams in _cpu.pyx). A plain store
 * first reads the line it writes (write-allocate); a streaming store does not,
 * so an elementwise pass moves one tensor less. Values are computed by the same
 * loop either way (into a small L1 buffer, then streamed), so the bits do not
 * depend on the choice. Only whole 64-byte lines are streamed: a line written
 * partly by each kind of store costs several times more. The kernels do not
 * fence: each thread calls fastbn_stream_fence() once after its last call (a
 * fence per call flushed the half-filled line at the end of every run, which
 * was slower than not streaming at all).
 */
/* The L1 buffer holds 256 bytes (64 floats, 32 doubles). Its size in bytes, not in
   values, is what matters: in a C harness (2 threads, planes of 3136 and 6272 values,
   streaming on) 2 KiB buffers wrote 27-37 GB/s, 256-1024 byte buffers 50-65 GB/s,
   likely loads of the input stalled behind buffer stores whose addresses match
   modulo 4 KiB, the more often the bigger the buffer; float64 had 2 KiB (256
   values), and its streamed eval ran at 0.4-0.7x the speed of plain stores. */
#define FASTBN_STREAM_CHUNK_BYTES 256
/* shorter runs (the 196-byte planes of a 7x7 layer) are mostly partial lines */
#define FASTBN_STREAM_MIN_RUN 512
#if (defined(__SSE2__) || defined(_M_X64)) && !defined(FASTBN_NO_STREAM)
#include <emmintrin.h>
#include <stdint.h>
#define FASTBN_HAVE_STREAM 1
static inline void fastbn_stream_f32(float *dst, const float *src, ptrdiff_t n) {
    for (ptrdiff_t i = 0; i < n; i += 4)
        _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
}
static inline void fastbn_stream_f64(double *dst, const double *src, ptrdiff_t n) {
    for (ptrdiff_t i = 0; i < n; i += 2)
        _mm_stream_pd(dst + i, _mm_loadu_pd(src + i));
}
/* values of `size` bytes before p + k * size starts a cache line (n if never) */
static inline ptrdiff_t fastbn_stream_lead(const void *p, size_t size, ptrdiff_t n) {
    uintptr_t a = (uintptr_t)p;
    ptrdiff_t lead = a % size ? n : (ptrdiff_t)(((64 - a % 64) % 64) / size);
    return lead < n ? lead : n;
}
static inline void fastbn_stream_fence(void) { _mm_sfence(); }
#else
#define FASTBN_HAVE_STREAM 0
static inline void fastbn_stream_f32(float *dst, const float *src, ptrdiff_t n) {
    memcpy(dst, src, (size_t)n * sizeof *dst);
}
static inline void fastbn_stream_f64(double *dst, const double *src, ptrdiff_t n) {
    memcpy(dst, src, (size_t)n * sizeof *dst);
}
static inline ptrdiff_t fastbn_stream_lead(const void *p, size_t size, ptrdiff_t n) {
    (void)p;
    (void)size;
    return n;
}
static inline void fastbn_stream_fence(void) {}
#endif

/*
 * out[0:n] from SPAN(i0, dst, len), which writes values i0 .. i0 + len - 1 of
 * the output to dst[0:len]. Without `nt` that is one plain loop; with it, the
 * whole lines go chunk by chunk through an L1 buffer and streaming stores.
 */
#define FASTBN_STREAMED(T, SUF, out, n, nt, SPAN)                                           \
    do {                                                                                    \
        if (!FASTBN_HAVE_STREAM || !(nt) || (n) * (ptrdiff_t)sizeof(T) < FASTBN_STREAM_MIN_RUN) {\
            SPAN(0, (out), (n));                                                            \
            break;                                                                          \
        }                                                                                   \
        ptrdiff_t i_ = fastbn_stream_lead((out), sizeof(T), (n));                           \
        ptrdiff_t end_ = i_ + ((n) - i_) / (64 / (ptrdiff_t)sizeof(T))                      \
                                        * (64 / (ptrdiff_t)sizeof(T));                      \
        T buf_[FASTBN_STREAM_CHUNK_BYTES / sizeof(T)];                                      \
        SPAN(0, (out), i_);                                                                 \
        while (i_ < end_) {                                                                 \
            const ptrdiff_t chunk_ = FASTBN_STREAM_CHUNK_BYTES / (ptrdiff_t)sizeof(T);      \
            ptrdiff_t len_ = end_ - i_ < chunk_ ? end_ - i_ : chunk_;                       \
            SPAN(i_, buf_, len_);                                                           \
            fastbn_stream_##SUF((out) + i_, buf_, len_);                                    \
            i_ += len_;                                                                     \
        }                                                                                   \
        SPAN(i_, (out) + i_, (n) - i_);                                                     \
    } while (0)

/* The elementwise spans, written over the kernels' own argument names. */
#define FASTBN_SPAN(i0, dst, len, EXPR)                                                     \
    for (ptrdiff_t j_ = 0; j_ < (len); j_++) {                                              \
        const ptrdiff_t o_ = (i0) + j_;                                                     \
        (dst)[j_] = EXPR;                                                                   \
    }
#define FASTBN_RUN_FMA(i0, dst, len) FASTBN_SPAN(i0, dst, len, x[o_] * sc + sh)
#define FASTBN_RUN_AFFINE(i0, dst, len) FASTBN_SPAN(i0, dst, len, (x[o_] - hi) * sc + sh)
#define FASTBN_ROWS_FMA(i0, dst, len) FASTBN_SPAN(i0, dst, len, x[o_] * sc[o_] + sh[o_])
#define FASTBN_ROWS_AFFINE(i0, dst, len) \
    FASTBN_SPAN(i0, dst, len, (x[o_] - hi[o_]) * sc[o_] + sh[o_])
/* grad_input with k folded into the other coefficients (ak = a * k, mk = m * k): two
   multiply-adds a value where (dy - (x - hi) * a - m) * k took four operations, and
   one coefficient array less for the channel-inner rows when hi is 0: the whole
   channel-inner float32 backward took 0.76-0.87x the time ((100352, 64) and
   (4096, 1024), A/B of two builds in one process, 2 threads), channel-outer no change. */
#define FASTBN_ROWS_GRAD_INPUT(i0, dst, len) \
    FASTBN_SPAN(i0, dst, len, dy[o_] * k[o_] - ((x[o_] - hi[o_]) * ak[o_] + mk[o_]))
#define FASTBN_ROWS_GRAD_INPUT_FMA(i0, dst, len) \
    FASTBN_SPAN(i0, dst, len, dy[o_] * k[o_] - (x[o_] * ak[o_] + mk[o_]))
#define FASTBN_RUN_GRAD_INPUT(i0, dst, len) \
    FASTBN_SPAN(i0, dst, len, dy[o_] * k - ((x[o_] - hi) * ak + mk))
#define FASTBN_RUN_GRAD_INPUT_FMA(i0, dst, len) \
    FASTBN_SPAN(i0, dst, len, dy[o_] * k - (x[o_] * ak + mk))


static inline double fastbn_tree8(const double *v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

typedef struct { double mean; double m2; } fastbn_moments;
typedef struct { double dy; double dyx; double x; } fastbn_gradsums;
#define FASTBN_GRAD_LANES (3 * FASTBN_LANES)
#define FASTBN_MOMENT_LANES (2 * FASTBN_LANES)

/* M2 = squares - total**2 / cnt, at least 0; NaN stays NaN (NaN or inf in the data),
   but squares that overflowed on finite data give +inf, not inf - inf: whether the
   product overflows first depends on FMA contraction, which differs between clones. */
static inline double fastbn_m2(double total, double squares, double cnt) {
    double m2 = squares - total * (total / cnt);
    if (m2 < 0)
        m2 = 0;
    if (m2 != m2 && squares > DBL_MAX && total >= -DBL_MAX && total <= DBL_MAX)
        m2 = squares;
    return m2;
}

/* Moments of cnt values from the sum (total) and sum of squares of their deviations
   from shift. */
static inline fastbn_moments fastbn_group_moments(double total, double squares, double shift,
                                                  double cnt) {
    fastbn_moments r;
    r.mean = shift + total / cnt;
    r.m2 = fastbn_m2(total, squares, cnt);
    return r;
}

/* Moments of cnt values from fastbn_runs_moments_lanes' lanes around shift. */
static inline fastbn_moments fastbn_lanes_moments(const double *lanes, double shift,
                                                  double cnt) {
    return fastbn_group_moments(fastbn_tree8(lanes), fastbn_tree8(lanes + FASTBN_LANES), shift,
                                cnt);
}

/* The sums held in fastbn_runs_grad_lanes' lanes. */
static inline fastbn_gradsums fastbn_lanes_gradsums(const double *lanes) {
    fastbn_gradsums r;
    r.dy = fastbn_tree8(lanes);
    r.dyx = fastbn_tree8(lanes + FASTBN_LANES);
    r.x = fastbn_tree8(lanes + 2 * FASTBN_LANES);
    return r;
}

/*
 * Explicit 4 x double vectors (GCC/Clang vector extensions) for the float64
 * accumulations: the auto-vectoriser does not turn the float -> double lanes
 * below into SIMD on its own. Lane j of (lo, hi) = lane j of the scalar code, so
 * both spellings sum in the same order; GCC contracts the float64 multiply-adds
 * of the two differently, so their last bits can differ (the float32 partials
 * below come out identical; tests/test_build.py builds the scalar spelling).
 * Other compilers take the scalar path.
 */
#if (defined(__GNUC__) || defined(__clang__)) && !defined(FASTBN_NO_VECTOR_EXT)
#define FASTBN_VEC 1
/* The helpers below are always inlined, so passing 32-byte vectors by value
   never crosses a call boundary whatever instruction set a clone uses. */
#pragma GCC diagnostic ignored "-Wpsabi"
#define FASTBN_VINLINE static inline __attribute__((always_inline))
typedef double fastbn_v4d __attribute__((vector_size(32)));

/* Element by element: GCC 12 turns this into one vcvtps2pd from memory, where
   __builtin_convertvector of a 4-float vector became two 2-float conversions and a
   lane insert, and the grad sums of float32 input took 1.6x the time (C harness,
   runs of 64-3136 values from the L2, one core of the 2-core EPYC). */
FASTBN_VINLINE fastbn_v4d fastbn_load4_f32(const float *p) {
    fastbn_v4d v = {p[0], p[1], p[2], p[3]};
    return v;
}

FASTBN_VINLINE fastbn_v4d fastbn_load4_f64(const double *p) {
    fastbn_v4d v;
    memcpy(&v, p, sizeof v);
    return v;
}

FASTBN_VINLINE void fastbn_store_lanes(double *lanes, fastbn_v4d lo, fastbn_v4d hi) {
    memcpy(lanes, &lo, sizeof lo);
    memcpy(lanes + 4, &hi, sizeof hi);
}
#endif

/* Main loops of the lane reductions over count runs (fastbn_runs_grad_lanes,
   fastbn_runs_moments_lanes): 8 lanes over i < n8 (a multiple of 8), a run's last
   n % 8 values into lane 0 one by one. The lanes stay in registers from run to run
   (through memory, a run's tail written into lane 0 and read back as a vector
   stalled store forwarding on every run). */
#ifdef FASTBN_VEC
#define FASTBN_GRAD_RUNS(LOAD)                                                              \
    {                                                                                       \
        const fastbn_v4d vc = {center, center, center, center};                             \
        fastbn_v4d g0 = {0, 0, 0, 0}, g1 = g0, p0 = g0, p1 = g0, q0 = g0, q1 = g0;          \
        if (!fresh) {                                                                       \
            g0 = fastbn_load4_f64(g);                                                       \
            g1 = fastbn_load4_f64(g + 4);                                                   \
            p0 = fastbn_load4_f64(p);                                                       \
            p1 = fastbn_load4_f64(p + 4);                                                   \
            q0 = fastbn_load4_f64(q);                                                       \
            q1 = fastbn_load4_f64(q + 4);                                                   \
        }                                                                                   \
        for (ptrdiff_t r = 0; r < count; r++) {                                             \
            const fastbn_t *FASTBN_RESTRICT dy = dy0 + r * stride;                          \
            const fastbn_t *FASTBN_RESTRICT x = x0 + r * stride;                            \
            ptrdiff_t i = 0;                                                                \
            for (; i < n8; i += FASTBN_LANES) {                                             \
                fastbn_v4d d0 = LOAD(dy + i), d1 = LOAD(dy + i + 4);                        \
                fastbn_v4d e0 = LOAD(x + i) - vc, e1 = LOAD(x + i + 4) - vc;                \
                g0 += d0;                                                                   \
                g1 += d1;                                                                   \
                p0 += d0 * e0;                                                              \
                p1 += d1 * e1;                                                              \
                q0 += e0;                                                                   \
                q1 += e1;                                                                   \
            }                                                                               \
            for (; i < n; i++) {                                                            \
                double d = (double)dy[i], e = (double)x[i] - center;                        \
                g0[0] += d;                                                                 \
                p0[0] += d * e;                                                             \
                q0[0] += e;                                                                 \
            }                                                                               \
        }                                                                                   \
        fastbn_store_lanes(g, g0, g1);                                                      \
        fastbn_store_lanes(p, p0, p1);                                                      \
        fastbn_store_lanes(q, q0, q1);                                                      \
    }
#define FASTBN_MOMENTS_RUNS(LOAD)                                                           \
    {                                                                                       \
        const fastbn_v4d vs = {shift, shift, shift, shift};                                 \
        fastbn_v4d s0 = {0, 0, 0, 0}, s1 = s0, q0 = s0, q1 = s0;                            \
        if (!fresh) {                                                                       \
            s0 = fastbn_load4_f64(su);                                                      \
            s1 = fastbn_load4_f64(su + 4);                                                  \
            q0 = fastbn_load4_f64(sq);                                                      \
            q1 = fastbn_load4_f64(sq + 4);                                                  \
        }                                                                                   \
        for (ptrdiff_t r = 0; r < count; r++) {                                             \
            const fastbn_t *FASTBN_RESTRICT p = p0 + r * stride;                            \
            ptrdiff_t i = 0;                                                                \
            for (; i < n8; i += FASTBN_LANES) {                                             \
                fastbn_v4d d0 = LOAD(p + i) - vs, d1 = LOAD(p + i + 4) - vs;                \
                s0 += d0;                                                                   \
                s1 += d1;                                                                   \
                q0 += d0 * d0;                                                              \
                q1 += d1 * d1;                                                              \
            }                                                                               \
            for (; i < n; i++) {                                                            \
                double d = (double)p[i] - shift;                                            \
                s0[0] += d;                                                                 \
                q0[0] += d * d;                                                             \
            }                                                                               \
        }                                                                                   \
        fastbn_store_lanes(su, s0, s1);                                                     \
        fastbn_store_lanes(sq, q0, q1);                                                     \
    }
#define FASTBN_MOMENTS_RUNS_f32 FASTBN_MOMENTS_RUNS(fastbn_load4_f32)
#define FASTBN_MOMENTS_RUNS_f64 FASTBN_MOMENTS_RUNS(fastbn_load4_f64)
#define FASTBN_GRAD_RUNS_f32 FASTBN_GRAD_RUNS(fastbn_load4_f32)
#define FASTBN_GRAD_RUNS_f64 FASTBN_GRAD_RUNS(fastbn_load4_f64)
#else
#define FASTBN_MOMENTS_RUNS_SCALAR                                                          \
    if (fresh)                                                                              \
        memset(lanes, 0, FASTBN_MOMENT_LANES * sizeof(double));                             \
    for (ptrdiff_t r = 0; r < count; r++) {                                                 \
        const fastbn_t *FASTBN_RESTRICT p = p0 + r * stride;                                \
        ptrdiff_t i = 0;                                                                    \
        for (; i < n8; i += FASTBN_LANES) {                                                 \
            for (int j = 0; j < FASTBN_LANES; j++) {                                        \
                double d = (double)p[i + j] - shift;                                        \
                su[j] += d;                                                                 \
                sq[j] += d * d;                                                             \
            }                                                                               \
        }                                                                                   \
        for (; i < n; i++) {                                                                \
            double d = (double)p[i] - shift;                                                \
            su[0] += d;                                                                     \
            sq[0] += d * d;                                                                 \
        }                                                                                   \
    }
#define FASTBN_MOMENTS_RUNS_f32 FASTBN_MOMENTS_RUNS_SCALAR
#define FASTBN_MOMENTS_RUNS_f64 FASTBN_MOMENTS_RUNS_SCALAR
#define FASTBN_GRAD_RUNS_SCALAR                                                             \
    if (fresh)                                                                              \
        memset(lanes, 0, FASTBN_GRAD_LANES * sizeof(double));                               \
    for (ptrdiff_t r = 0; r < count; r++) {                                                 \
        const fastbn_t *FASTBN_RESTRICT dy = dy0 + r * stride;                              \
        const fastbn_t *FASTBN_RESTRICT x = x0 + r * stride;                                \
        ptrdiff_t i = 0;                                                                    \
        for (; i < n8; i += FASTBN_LANES) {                                                 \
            for (int j = 0; j < FASTBN_LANES; j++) {                                        \
                double d = (double)dy[i + j], e = (double)x[i + j] - center;                \
                g[j] += d;                                                                  \
                p[j] += d * e;                                                              \
                q[j] += e;                                                                  \
            }                                                                               \
        }                                                                                   \
        for (; i < n; i++) {                                                                \
            double d = (double)dy[i], e = (double)x[i] - center;                            \
            g[0] += d;                                                                      \
            p[0] += d * e;                                                                  \
            q[0] += e;                                                                      \
        }                                                                                   \
    }
#define FASTBN_GRAD_RUNS_f32 FASTBN_GRAD_RUNS_SCALAR
#define FASTBN_GRAD_RUNS_f64 FASTBN_GRAD_RUNS_SCALAR
#endif

#define FASTBN_DEFINE_KERNELS(T, SUF)                                                       \
                                                                                            \
/* y = (x - hi[r]) * sc[r] + sh[r] over count planes of n values back to back (plane r  \
   at r * n), per-plane coefficients (hi[r] == 0: one multiply-add). One call for a    \
   row of small planes, not one per plane (see _plane_chunk in _cpu.pyx). */          \
FASTBN_KERNEL void fastbn_planes_affine_##SUF(const T *FASTBN_RESTRICT x0,                  \
        T *FASTBN_RESTRICT y0, ptrdiff_t n, ptrdiff_t count, const T *FASTBN_RESTRICT his,  \
        const T *FASTBN_RESTRICT scs, const T *FASTBN_RESTRICT shs, int nt) {               \
    for (ptrdiff_t r = 0; r < count; r++) {                                                 \
        const T *FASTBN_RESTRICT x = x0 + r * n;                                            \
        T *FASTBN_RESTRICT y = y0 + r * n;                                                  \
        const T hi = his[r], sc = scs[r], sh = shs[r];                                      \
        if (hi == 0)                                                                        \
            FASTBN_STREAMED(T, SUF, y, n, nt, FASTBN_RUN_FMA);                              \
        else                                                                                \
            FASTBN_STREAMED(T, SUF, y, n, nt, FASTBN_RUN_AFFINE);                           \
    }                                                                                       \
}                                                                                           \
                                                                                            \
/* Adds sum (x - shift) and sum (x - shift)**2 of count runs of n values (run r at     \
   r * stride) into lanes [s | q], FASTBN_MOMENT_LANES doubles (fastbn_lanes_moments  \
   totals them), or starts them from 0 when fresh; as fastbn_runs_grad_lanes. */       \
FASTBN_KERNEL void fastbn_runs_moments_lanes_##SUF(const T *FASTBN_RESTRICT p0,            \
        ptrdiff_t n, ptrdiff_t count, ptrdiff_t stride, double shift,                       \
        double *FASTBN_RESTRICT lanes, int fresh) {                                         \
    typedef T fastbn_t;     /* the element type, for FASTBN_MOMENTS_RUNS */                 \
    double *su = lanes, *sq = lanes + FASTBN_LANES;                                         \
    const ptrdiff_t n8 = n - n % FASTBN_LANES;                                              \
    FASTBN_MOMENTS_RUNS_##SUF                                                               \
}                                                                                           \
                                                                                            \
/* Mean and sum of squared deviations of n >= 1 values, summed around p[0]. */              \
FASTBN_KERNEL fastbn_moments fastbn_run_moments_##SUF(const T *FASTBN_RESTRICT p,           \
                                                     ptrdiff_t n) {                         \
    double lanes[FASTBN_MOMENT_LANES];                                                      \
    fastbn_runs_moments_lanes_##SUF(p, n, 1, 0, (double)p[0], lanes, 1);                    \
    return fastbn_lanes_moments(lanes, (double)p[0], (double)n);                            \
}                                                                                           \
                                                                                            \
/* Adds sum dy, sum dy * (x - c) and sum (x - c) of count runs of n values (run r at  \
   r * stride) into lanes [g | p | q], FASTBN_GRAD_LANES doubles (fastbn_lanes_gradsums  \
   totals them), or starts them from 0 when fresh. Run by run, so k calls over one    \
   run each give the bits of one call over k runs; the lanes carry over from run to   \
   run, so short runs (7x7 planes) pay one tree reduction per unit, not per run       \
   (1.7-1.9x faster on 49-64 values a run, C harness, one core). */                     \
FASTBN_KERNEL void fastbn_runs_grad_lanes_##SUF(const T *FASTBN_RESTRICT dy0,              \
        const T *FASTBN_RESTRICT x0, ptrdiff_t n, ptrdiff_t count, ptrdiff_t stride,        \
        double center, double *FASTBN_RESTRICT lanes, int fresh) {                          \
    typedef T fastbn_t;     /* the element type, for FASTBN_GRAD_RUNS */                    \
    double *g = lanes, *p = lanes + FASTBN_LANES, *q = lanes + 2 * FASTBN_LANES;            \
    const ptrdiff_t n8 = n - n % FASTBN_LANES;                                              \
    FASTBN_GRAD_RUNS_##SUF                                                                  \
}                                                                                           \
                                                                                            \
/* gx = dy * k - ((x - hi) * ak + mk) over count planes back to back, per-plane       \
   coefficients (hi == 0: x * ak; hi, ak and mk all 0, eval: dy * k, x not read). */  \
FASTBN_KERNEL void fastbn_planes_grad_input_##SUF(const T *FASTBN_RESTRICT dy0,             \
        const T *FASTBN_RESTRICT x0, T *FASTBN_RESTRICT gx0, ptrdiff_t n, ptrdiff_t count,  \
        const T *FASTBN_RESTRICT his, const T *FASTBN_RESTRICT aks,                         \
        const T *FASTBN_RESTRICT mks, const T *FASTBN_RESTRICT ks, int nt) {                \
    for (ptrdiff_t r = 0; r < count; r++) {                                                 \
        const T *FASTBN_RESTRICT dy = dy0 + r * n;                                          \
        T *FASTBN_RESTRICT gx = gx0 + r * n;                                                \
        const T hi = his[r], ak = aks[r], mk = mks[r], k = ks[r];                           \
        if (hi == 0 && ak == 0 && mk == 0) {                                                \
            const T *FASTBN_RESTRICT x = dy;                                                \
            const T sc = k, sh = 0;                                                         \
            FASTBN_STREAMED(T, SUF, gx, n, nt, FASTBN_RUN_FMA);                             \
        } else {                                                                            \
            const T *FASTBN_RESTRICT x = x0 + r * n;                                        \
            if (hi == 0)                                                                    \
                FASTBN_STREAMED(T, SUF, gx, n, nt, FASTBN_RUN_GRAD_INPUT_FMA);              \
            else                                                                            \
                FASTBN_STREAMED(T, SUF, gx, n, nt, FASTBN_RUN_GRAD_INPUT);                  \
        }                                                                                   \
    }                                                                                       \
}                                                                                           \
                                                                                            \
/* Column sums of (x - shift) and of its square over rows [r0, r1) of width w. */         \
FASTBN_KERNEL void fastbn_rows_moments_##SUF(const T *FASTBN_RESTRICT base, ptrdiff_t w,    \
        ptrdiff_t r0, ptrdiff_t r1, double *FASTBN_RESTRICT su, double *FASTBN_RESTRICT sq, \
        const double *FASTBN_RESTRICT shift) {                                              \
    for (ptrdiff_t j = 0; j < w; j++) {                                                     \
        su[j] = 0;                                                                          \
        sq[j] = 0;                                                                          \
    }                                                                                       \
    ptrdiff_t r = r0, ahead = FASTBN_AHEAD(T, w) * w;                                       \
    ptrdiff_t fetch = w * (ptrdiff_t)sizeof(T) < FASTBN_WIDE_ROW ? 4 * w : 0;               \
    /* four rows per sweep: a quarter of the loads and stores of su and sq */               \
    for (; r + 4 <= r1; r += 4) {                                                           \
        const T *FASTBN_RESTRICT a0 = base + r * w;                                         \
        const T *FASTBN_RESTRICT a1 = a0 + w;                                               \
        const T *FASTBN_RESTRICT a2 = a1 + w;                                               \
        const T *FASTBN_RESTRICT a3 = a2 + w;                                               \
        for (ptrdiff_t k = 0; k < fetch; k += FASTBN_LINE_VALUES(T))                        \
            FASTBN_PREFETCH(a0 + ahead + k);                                                \
        for (ptrdiff_t j = 0; j < w; j++) {                                                 \
            double f = shift[j];                                                            \
            double d0 = (double)a0[j] - f, d1 = (double)a1[j] - f;                          \
            double d2 = (double)a2[j] - f, d3 = (double)a3[j] - f;                          \
            su[j] += (d0 + d1) + (d2 + d3);                                                 \
            /* a chain of multiply-adds: 4 operations where the tree took 6 */              \
            sq[j] = (((sq[j] + d0 * d0) + d1 * d1) + d2 * d2) + d3 * d3;                    \
        }                                                                                   \
    }                                                                                       \
    for (; r < r1; r++) {                                                                   \
        const T *FASTBN_RESTRICT row = base + r * w;                                        \
        for (ptrdiff_t j = 0; j < w; j++) {                                                 \
            double d = (double)row[j] - shift[j];                                           \
            su[j] += d;                                                                     \
            sq[j] += d * d;                                                                 \
        }                                                                                   \
    }                                                                                       \
}                                                                                           \
                                                                                            \
/* y = (x - hi) * sc + sh over n values with per-column coefficients; hi == NULL stands  \
   for all zeros (one multiply-add a value, one coefficient array less to stream). */      \
FASTBN_KERNEL void fastbn_rows_affine_##SUF(const T *FASTBN_RESTRICT x, T *FASTBN_RESTRICT y,\
        ptrdiff_t n, const T *FASTBN_RESTRICT hi, const T *FASTBN_RESTRICT sc,              \
        const T *FASTBN_RESTRICT sh, int nt) {                                              \
    if (hi == NULL)                                                                         \
        FASTBN_STREAMED(T, SUF, y, n, nt, FASTBN_ROWS_FMA);                                 \
    else                                                                                    \
        FASTBN_STREAMED(T, SUF, y, n, nt, FASTBN_ROWS_AFFINE);                              \
}                                                                                           \
                                                                                            \
/* Column sums [dy | dy * (x - c) | (x - c)] over rows [r0, r1) of width w into out[3w]. */ \
FASTBN_KERNEL void fastbn_rows_grad_sums_##SUF(const T *FASTBN_RESTRICT dy,                 \
        const T *FASTBN_RESTRICT x, ptrdiff_t w, ptrdiff_t r0, ptrdiff_t r1,                \
        const double *FASTBN_RESTRICT center, double *FASTBN_RESTRICT out) {                \
    double *FASTBN_RESTRICT g = out;                                                        \
    double *FASTBN_RESTRICT p = out + w;                                                    \
    double *FASTBN_RESTRICT q = out + 2 * w;                                                \
    memset(out, 0, 3 * (size_t)w * sizeof(double));                                        \
    ptrdiff_t r = r0, ahead = FASTBN_AHEAD(T, w) * w;                                       \
    if (w * (ptrdiff_t)sizeof(T) >= FASTBN_WIDE_ROW) {                                      \
        /* wide rows: four per sweep, no prefetch (the order depends on w only) */         \
        for (; r + 4 <= r1; r += 4) {                                                       \
            const T *FASTBN_RESTRICT dy0 = dy + r * w, *FASTBN_RESTRICT x0 = x + r * w;     \
            for (ptrdiff_t j = 0; j < w; j++) {                                             \
                double c = center[j];                                                       \
                double d0 = (double)dy0[j], e0 = (double)x0[j] - c;                         \
                double d1 = (double)dy0[j + w], e1 = (double)x0[j + w] - c;                 \
                double d2 = (double)dy0[j + 2 * w], e2 = (double)x0[j + 2 * w] - c;         \
                double d3 = (double)dy0[j + 3 * w], e3 = (double)x0[j + 3 * w] - c;         \
                g[j] += (d0 + d1) + (d2 + d3);                                              \
                p[j] = (((p[j] + d0 * e0) + d1 * e1) + d2 * e2) + d3 * e3;                  \
                q[j] += (e0 + e1) + (e2 + e3);                                              \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
    /* narrow rows: two per sweep (more did not keep the prefetches ahead) */              \
    for (; r + 2 <= r1; r += 2) {                                                           \
        const T *FASTBN_RESTRICT dy0 = dy + r * w, *FASTBN_RESTRICT dy1 = dy0 + w;         \
        const T *FASTBN_RESTRICT x0 = x + r * w, *FASTBN_RESTRICT x1 = x0 + w;              \
        for (ptrdiff_t k = 0; k < 2 * w; k += FASTBN_LINE_VALUES(T)) {                      \
            FASTBN_PREFETCH(dy0 + ahead + k);                                               \
            FASTBN_PREFETCH(x0 + ahead + k);                                                \
        }                                                                                   \
        for (ptrdiff_t j = 0; j < w; j++) {                                                 \
            double c = center[j];                                                           \
            double d0 = (double)dy0[j], e0 = (double)x0[j] - c;                             \
            double d1 = (double)dy1[j], e1 = (double)x1[j] - c;                             \
            g[j] += d0 + d1;                                                                \
            p[j] = (p[j] + d0 * e0) + d1 * e1;                                              \
            q[j] += e0 + e1;                                                                \
        }                                                                                   \
    }                                                                                       \
    for (; r < r1; r++) {                                                                   \
        const T *FASTBN_RESTRICT rdy = dy + r * w;                                          \
        const T *FASTBN_RESTRICT rx = x + r * w;                                            \
        for (ptrdiff_t j = 0; j < w; j++) {                                                 \
            double d = (double)rdy[j], e = (double)rx[j] - center[j];                       \
            g[j] += d;                                                                      \
            p[j] += d * e;                                                                  \
            q[j] += e;                                                                      \
        }                                                                                   \
    }                                                                                       \
}                                                                                           \
                                                                                            \
/* gx = dy * k - ((x - hi) * ak + mk) over n values, per-column coefficients; hi == NULL  \
   stands for all zeros (x * ak). */                                                        \
FASTBN_KERNEL void fastbn_rows_grad_input_##SUF(const T *FASTBN_RESTRICT dy,                \
        const T *FASTBN_RESTRICT x, T *FASTBN_RESTRICT gx, ptrdiff_t n,                     \
        const T *FASTBN_RESTRICT hi, const T *FASTBN_RESTRICT ak,                           \
        const T *FASTBN_RESTRICT mk, const T *FASTBN_RESTRICT k, int nt) {                  \
    if (hi == NULL)                                                                         \
        FASTBN_STREAMED(T, SUF, gx, n, nt, FASTBN_ROWS_GRAD_INPUT_FMA);                     \
    else                                                                                    \
        FASTBN_STREAMED(T, SUF, gx, n, nt, FASTBN_ROWS_GRAD_INPUT);                         \
}

FASTBN_DEFINE_KERNELS(float, f32)
FASTBN_DEFINE_KERNELS(double, f64)

/*
 * float32 moments with float32 partials ("_f32p"), used for float32 input.
 *
 * Widening every value to double costs a conversion and double-width arithmetic
 * per value, and where the data come from the L2 or the L3 that arithmetic, not
 * memory, is the limit. Measured through _cpu (alternating calls of two builds,
 * 2 threads, 2-core EPYC), moments of float32 input took 0.48x the time on the
 * 3-D row (8, 32, 16384), 0.62x on (32, 64, 3136) planes, 0.76x on the folded
 * rows of (100352, 64) and 0.91x on (4096, 1024); from DRAM it makes no difference.
 *
 * Each float lane sums a short run of deviations from a shift (at most
 * FASTBN_F32_PART values), then the partial is added to float64 lanes, so the
 * rounding of a partial is relative to a few deviations, never to the offset of
 * the data or to the running total. The errors are bounded by the sum of squared
 * deviations from the shift: the sum within about FASTBN_F32_PART * 2**-24 *
 * sqrt(n * squares), the squares within FASTBN_F32_PART * 2**-24 * squares, and M2
 * (squares less the shift's share) within about 3 * FASTBN_F32_PART * 2**-24 *
 * squares. The shift is a pilot mean of a few values, and the kernels check
 * that squares <= FASTBN_F32_CANCEL * M2 (the shift within one standard deviation
 * of the mean), the range (no float overflow or underflow) and finiteness, and
 * sum again wherever a check fails (NaN input included): a run or a few columns
 * in float64, a block of rows with many failed columns first in float32 around
 * its own mean, then in float64. M2 is within about 3e-6 relative and the mean
 * within 7e-7 standard deviations in the worst case (typically 1e-7 and 1e-8),
 * where the float64 kernels are exact to about 1e-15. Odd data cost time, not
 * precision; the summation order depends only on the data's shape and values,
 * never on the thread count.
 *
 * Reductions of products (the grad sums) stay in float64: their terms can cancel
 * (a gradient with a large common part, a running mean far from the batch) and
 * no cheap check bounds a float32 partial of dy * (x - c) against the result.
 */
#define FASTBN_F32_PART 8
#define FASTBN_F32_CANCEL 2.0
/* values averaged for the pilot shift */
#define FASTBN_F32_PILOT 16
/* a block of rows with more failed columns is summed again whole */
#define FASTBN_F32P_REDO_COLUMNS 8
/* Callers use the run kernels below for runs of at least this many values: shorter
   ones (the 49-value planes of a 7x7 layer) spend more on folding partials and on
   the checks than they save (1.10-1.18x the time of the float64 kernels). */
#define FASTBN_F32P_MIN_RUN (16 * FASTBN_F32_PART)
/* squares below this per value would have partials in float32's subnormal range */
#define FASTBN_F32_TINY 7.888609052210118e-31   /* 2**-100 */

/* Whether float32-partial sums of n deviations (sum, sum of squares; inv_n = 1 / n)
   kept their precision. Branch-free, so that a loop over columns vectorises.
   Squares of 0 fail too: they come from a constant channel (exact either way) or
   from deviations whose squares all fell below float32's subnormals, which the
   partials cannot tell apart (a review found the variance reported as 0 where it
   was 4e-47, which a tiny eps makes visible); constant channels are rare as
   BatchNorm input and cost one float64 pass. */
static inline int fastbn_f32p_moments_ok(double total, double squares, double n,
                                         double inv_n) {
    double m2 = squares - total * total * inv_n;
    return (squares <= FASTBN_F32_CANCEL * m2) & (squares >= n * FASTBN_F32_TINY)
           & (squares <= 1e300);                      /* false for NaN and inf */
}

#ifdef FASTBN_VEC
typedef float fastbn_v16f __attribute__((vector_size(64)));
typedef double fastbn_v8d __attribute__((vector_size(64)));
FASTBN_VINLINE fastbn_v16f fastbn_load16_f32(const float *p) {
    fastbn_v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}
/* lanes 0-7 / 8-15 of a partial, widened */
FASTBN_VINLINE fastbn_v8d fastbn_lo8(fastbn_v16f a) {
    return __builtin_convertvector(__builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7),
                                   fastbn_v8d);
}
FASTBN_VINLINE fastbn_v8d fastbn_hi8(fastbn_v16f a) {
    return __builtin_convertvector(
        __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15), fastbn_v8d);
}
FASTBN_VINLINE void fastbn_add_partial(double *lanes, fastbn_v16f a) {
    fastbn_v8d lo, hi;
    memcpy(&lo, lanes, sizeof lo);
    memcpy(&hi, lanes + 8, sizeof hi);
    lo += fastbn_lo8(a);
    hi += fastbn_hi8(a);
    memcpy(lanes, &lo, sizeof lo);
    memcpy(lanes + 8, &hi, sizeof hi);
}
#define FASTBN_F32P_MOMENTS_RUN                                                             \
    while (i < n16) {                                                                       \
        ptrdiff_t end = n16 - i > 16 * FASTBN_F32_PART ? i + 16 * FASTBN_F32_PART : n16;    \
        fastbn_v16f a = fastbn_load16_f32(p + i) - sf, b = a * a;                           \
        for (i += 16; i < end; i += 16) {                                                   \
            fastbn_v16f d = fastbn_load16_f32(p + i) - sf;                                  \
            a += d;                                                                         \
            b += d * d;                                                                     \
        }                                                                                   \
        fastbn_add_partial(s, a);                                                           \
        fastbn_add_partial(q, b);                                                           \
    }
#else
/* the same order, lane by lane */
#define FASTBN_F32P_MOMENTS_RUN                                                             \
    while (i < n16) {                                                                       \
        ptrdiff_t end = n16 - i > 16 * FASTBN_F32_PART ? i + 16 * FASTBN_F32_PART : n16;    \
        for (int j = 0; j < 16; j++) {                                                      \
            float a = p[i + j] - sf, b = a * a;                                             \
            for (ptrdiff_t k = i + 16 + j; k < end; k += 16) {                              \
                float d = p[k] - sf;                                                        \
                a += d;                                                                     \
                b += d * d;                                                                 \
            }                                                                               \
            s[j] += (double)a;                                                              \
            q[j] += (double)b;                                                              \
        }                                                                                   \
        i = end;                                                                            \
    }
#endif

/* The shift for float32 partials: the mean of FASTBN_F32_PILOT values spread evenly
   over the run p[0:n], rounded to float. Spread, not the first ones: in an image
   plane the first values are one edge of the image, which can sit far from the
   plane's mean, and every plane that fails the check is summed twice. _pilot_rows
   in _cpu.pyx does the same for the channel-inner columns. */
static inline float fastbn_pilot_f32(const float *p, ptrdiff_t n) {
    const ptrdiff_t m = n < FASTBN_F32_PILOT ? n : FASTBN_F32_PILOT;
    double acc = 0;
    for (ptrdiff_t i = 0; i < m; i++)
        acc += (double)p[i * n / m] / (double)m;
    return (float)acc;
}

/* fastbn_run_moments_f32 with float32 partials (same result type and meaning). */
FASTBN_KERNEL fastbn_moments fastbn_run_moments_f32p(const float *FASTBN_RESTRICT p,
                                                     ptrdiff_t n) {
    const float sf = fastbn_pilot_f32(p, n);
    const double shift = (double)sf;
    double s[16] = {0}, q[16] = {0};
    ptrdiff_t i = 0, n16 = n - n % 16;
    FASTBN_F32P_MOMENTS_RUN
    for (; i < n; i++) {
        double d = (double)p[i] - shift;
        s[0] += d;
        q[0] += d * d;
    }
    double total = fastbn_tree8(s) + fastbn_tree8(s + 8);
    double squares = fastbn_tree8(q) + fastbn_tree8(q + 8);
    if (!fastbn_f32p_moments_ok(total, squares, (double)n, 1.0 / (double)n))
        return fastbn_run_moments_f32(p, n);
    return fastbn_group_moments(total, squares, shift, (double)n);
}

/* Rows per sweep of the _f32p row reductions: the length of a float partial. Wide
   rows stream well with more rows in flight ((4096, 1024) moments in a C harness, 2
   threads: 0.163 ms at 8, 0.217 at 4). Narrow rows, which only the tail rows of a
   folded (M, C) call with C < 512 have, keep up their prefetches with 4 (unfolded
   rows of 64 values in the same harness: 0.280 ms at 4, 0.335 at 8). */
#define FASTBN_F32P_ROWS(w) ((w) * (ptrdiff_t)sizeof(float) >= FASTBN_WIDE_ROW ? 8 : 4)

/* Column j of the sweep starting at row a0, scalar; the vector form below takes 16
   columns at a time with the same per-column order (GCC's own vectorisation of this
   loop ran at half speed when rows were not 64-byte aligned, as NumPy's large arrays
   are not). */
#define FASTBN_F32P_ROWS_MOMENTS_COLUMN(RB, j)                                              \
    {                                                                                       \
        const float f = (float)local[j];                                                    \
        float d = a0[j] - f, ps = d, pq = d * d;                                            \
        for (int k = 1; k < (RB); k++) {                                                    \
            d = a0[j + k * w] - f;                                                          \
            ps += d;                                                                        \
            pq += d * d;                                                                    \
        }                                                                                   \
        su[j] += (double)ps;                                                                \
        sq[j] += (double)pq;                                                                \
    }
#ifdef FASTBN_VEC
typedef double fastbn_v16d __attribute__((vector_size(128)));
FASTBN_VINLINE fastbn_v16f fastbn_load16_f64_as_f32(const double *p) {
    fastbn_v16d v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, fastbn_v16f);
}
#define FASTBN_F32P_ROWS_MOMENTS_SWEEP(RB)                                                  \
    {                                                                                       \
        ptrdiff_t j = 0;                                                                    \
        for (; j + 16 <= w; j += 16) {                                                      \
            const fastbn_v16f f = fastbn_load16_f64_as_f32(local + j);                      \
            fastbn_v16f d = fastbn_load16_f32(a0 + j) - f, ps = d, pq = d * d;              \
            for (int k = 1; k < (RB); k++) {                                                \
                d = fastbn_load16_f32(a0 + j + k * w) - f;                                  \
                ps += d;                                                                    \
                pq += d * d;                                                                \
            }                                                                               \
            fastbn_add_partial(su + j, ps);                                                 \
            fastbn_add_partial(sq + j, pq);                                                 \
        }                                                                                   \
        for (; j < w; j++)                                                                  \
            FASTBN_F32P_ROWS_MOMENTS_COLUMN(RB, j)                                          \
    }
#else
#define FASTBN_F32P_ROWS_MOMENTS_SWEEP(RB)                                                  \
    for (ptrdiff_t j = 0; j < w; j++)                                                       \
        FASTBN_F32P_ROWS_MOMENTS_COLUMN(RB, j)
#endif
/* One float32-partial pass over rows [r0, r1): su, sq = column sums of x - local
   and its square (local[j] float values). Always inlined, so that each clone of
   the kernel below gets its own instruction set (a plain static function was
   compiled once, for baseline x86-64, and ran at half speed). */
#if defined(__GNUC__) || defined(__clang__)
#define FASTBN_ALWAYS_INLINE static inline __attribute__((always_inline))
#else
#define FASTBN_ALWAYS_INLINE static inline
#endif
FASTBN_ALWAYS_INLINE void fastbn_rows_f32p_pass(const float *FASTBN_RESTRICT base, ptrdiff_t w,
        ptrdiff_t r0, ptrdiff_t r1, double *FASTBN_RESTRICT su, double *FASTBN_RESTRICT sq,
        const double *FASTBN_RESTRICT local) {
    for (ptrdiff_t j = 0; j < w; j++) {
        su[j] = 0;
        sq[j] = 0;
    }
    ptrdiff_t r = r0, ahead = FASTBN_AHEAD(float, w) * w;
    if (FASTBN_F32P_ROWS(w) == 8) {
        for (; r + 8 <= r1; r += 8) {
            const float *FASTBN_RESTRICT a0 = base + r * w;
            FASTBN_F32P_ROWS_MOMENTS_SWEEP(8)
        }
    }
    for (; r + 4 <= r1; r += 4) {
        const float *FASTBN_RESTRICT a0 = base + r * w;
        if (FASTBN_F32P_ROWS(w) == 4)
            for (ptrdiff_t k = 0; k < 4 * w; k += FASTBN_LINE_VALUES(float))
                FASTBN_PREFETCH(a0 + ahead + k);
        FASTBN_F32P_ROWS_MOMENTS_SWEEP(4)
    }
    for (; r < r1; r++) {
        const float *FASTBN_RESTRICT row = base + r * w;
        for (ptrdiff_t j = 0; j < w; j++) {
            double d = (double)row[j] - local[j];
            su[j] += d;
            sq[j] += d * d;
        }
    }
}

FASTBN_ALWAYS_INLINE ptrdiff_t fastbn_f32p_failed(const double *FASTBN_RESTRICT su,
        const double *FASTBN_RESTRICT sq, ptrdiff_t w, double cnt, double inv) {
    ptrdiff_t failed = 0;
    for (ptrdiff_t j = 0; j < w; j++)
        failed += !fastbn_f32p_moments_ok(su[j], sq[j], cnt, inv);
    return failed;
}

/* fastbn_rows_moments_f32 with float32 partials: the same sums (around shift[j],
   float values), column by column. A block where more than FASTBN_F32P_REDO_COLUMNS
   columns fail the check (its mean is far from the shared shift: the images of an
   NHWC batch can be) gets a second float32 pass around its own mean from the first
   pass (in local[], scratch of w doubles), and where that fails too, a float64 pass;
   the few columns left are summed again in float64 one by one; sums taken around
   local[j] are moved to shift[j] in float64. */
FASTBN_KERNEL void fastbn_rows_moments_f32p(const float *FASTBN_RESTRICT base, ptrdiff_t w,
        ptrdiff_t r0, ptrdiff_t r1, double *FASTBN_RESTRICT su, double *FASTBN_RESTRICT sq,
        const double *FASTBN_RESTRICT shift, double *FASTBN_RESTRICT local) {
    const double cnt = (double)(r1 - r0), inv = 1.0 / cnt;
    const double *FASTBN_RESTRICT center = shift;
    fastbn_rows_f32p_pass(base, w, r0, r1, su, sq, shift);
    ptrdiff_t failed = fastbn_f32p_failed(su, sq, w, cnt, inv);
    if (failed > FASTBN_F32P_REDO_COLUMNS) {
        for (ptrdiff_t j = 0; j < w; j++)
            local[j] = (double)(float)(shift[j] + su[j] * inv);
        center = local;
        fastbn_rows_f32p_pass(base, w, r0, r1, su, sq, local);
        failed = fastbn_f32p_failed(su, sq, w, cnt, inv);
        if (failed > FASTBN_F32P_REDO_COLUMNS) {
            /* the float64 kernel over the block costs about what the partials did;
               column by column (strided) it cost up to 3x the call */
            fastbn_rows_moments_f32(base, w, r0, r1, su, sq, local);
            failed = 0;
        }
    }
    for (ptrdiff_t j = 0; failed && j < w; j++) {
        if (fastbn_f32p_moments_ok(su[j], sq[j], cnt, inv))
            continue;
        double ts = 0, tq = 0;
        for (ptrdiff_t i = r0; i < r1; i++) {
            double d = (double)base[i * w + j] - center[j];
            ts += d;
            tq += d * d;
        }
        su[j] = ts;
        sq[j] = tq;
    }
    if (center == local) {
        /* sums of x - local -> sums of x - shift (what the caller merges) */
        for (ptrdiff_t j = 0; j < w; j++) {
            const double moved = local[j] - shift[j];
            sq[j] += moved * (2 * su[j] + cnt * moved);
            su[j] += cnt * moved;
        }
    }
}

#endif /* FASTBN_KERNELS_H */
