// fastbn CUDA kernels: batch normalization for float and double CuPy arrays.
//
// Compiled at run time with NVRTC (fastbn/_gpu.py builds a cupy.RawModule with
// the template instantiations listed in fastbn._gpu.NAME_EXPRESSIONS). No
// #include: NVRTC compiles this file without any header search path.
//
// Layouts (chosen in Python by fastbn/_layout.py):
//   outer  x seen as (N, C, S), C-contiguous; the channel of flat index i is
//          (i / S) % C.
//   inner  x seen as (M, C), C contiguous (2-D input, channels-last memory).
//
// Every call is three launches at most:
//   forward train  stats_*  -> finalize_stats -> normalize_*
//   forward eval   affine_coefs -> normalize_*
//   backward       grad_sums_* -> finalize_grad -> grad_input_* (or normalize_*
//                  in eval, where grad_input = grad_output * invstd * weight)
//
// Step-by-step building blocks for SyncBatchNorm (float64 per-channel values in
// and out, two launches each):
//   moments        stats_* -> finalize_partials (mean, M2, count)
//   grad sums      grad_sums_* (double center) -> finalize_partials (sums)
//   normalize      coefs_from_stats -> normalize_*
//   grad input     coefs_from_stats -> grad_input_*
//
// Determinism: a reduction splits every channel over B blocks (B and the range
// of each block are a function of the shape only, computed in Python), each
// block writes its partial result into its own slot, and finalize_* merges the
// slots in a fixed order (one warp per channel, fixed lane assignment and a
// fixed shuffle tree). There are no floating-point atomics, so results are
// bit-identical from run to run.
//
// Accuracy: statistics are sums in double of the deviations from a shift, the
// channel's first value (the same in every block, so the partial sums add up:
// mean = shift + sum d / n, M2 = sum d^2 - (sum d)^2 / n). The subtraction in M2
// loses a factor 1 + (shift - mean)^2 / var of double's precision, and since the
// shift is one of the n values, (shift - mean)^2 <= n * var: at most log10(n + 1)
// of 16 digits. The elementwise passes compute ((x - hi) - lo) * scale + shift
// where hi + lo is the double mean split into two numbers of the input type. A
// float32 input with mean 1e6 and std 1 is normalized to float32 precision.
//
// Vectorised access: VEC elements (16 bytes) are one unit of work. For the
// reductions VEC depends only on the shape (S or C divisible by VEC) so the
// summation order does not change with the data pointer's alignment; ALIGNED
// picks 16-byte loads when every pointer allows it, scalar loads otherwise.

namespace fastbn {

constexpr int THREADS = 256;   // threads per block of every kernel
constexpr int WARP = 32;
constexpr int UNROLL = 4;      // independent loads in flight per thread and input
// grad_sums_* keep 64 bytes in flight per input instead, so that their scalar
// versions (VEC = 1: S or C not a multiple of 16 bytes) load 16 floats at a time.
// On an H100 (2026-11-28, (256, 512, 7, 7) float32) that took grad_sums_outer
// from 29.7 to 26.9 us; stats_outer got slower with it (24.9 -> 27.8 us) and the
// elementwise kernels spill registers, so they keep UNROLL. A thread still visits
// its values in increasing order: the sums do not depend on the unroll.
template <typename T, int VEC>
constexpr int wide_unroll() { return 64 / static_cast<int>(sizeof(T) * VEC); }
// Minimum resident blocks per SM for the streaming kernels: caps registers at
// 64 (one input) or 85 (two inputs, which keep twice the loads in flight) so
// that enough warps hide the memory latency without spilling.
constexpr int MIN_BLOCKS_1 = 4;
constexpr int MIN_BLOCKS_2 = 3;

// ---------------------------------------------------------------------------
// small helpers
// ---------------------------------------------------------------------------

__device__ __forceinline__ long long lmin(long long a, long long b) { return a < b ? a : b; }

// Full-warp shuffle: every caller has all 32 lanes active.
__device__ __forceinline__ double shfl_down(double v, int off) {
    return __shfl_down_sync(0xffffffffu, v, off);
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
    T v[VEC];
};

template <typename T, int VEC, bool ALIGNED>
__device__ __forceinline__ Pack<T, VEC> load(const T* __restrict__ p) {
    Pack<T, VEC> r;
    if constexpr (ALIGNED) {
        r = *reinterpret_cast<const Pack<T, VEC>*>(p);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) r.v[k] = p[k];
    }
    return r;
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* __restrict__ p, const Pack<T, VEC>& a) {
    // Only called with VEC > 1 when every pointer is 16-byte aligned.
    *reinterpret_cast<Pack<T, VEC>*>(p) = a;
}

// Sum Q values over a 1-D block of THREADS threads; the result is in thread 0.
// Fixed shuffle tree, then warp 0 adds the per-warp sums: deterministic.
template <int Q>
__device__ __forceinline__ void block_sum(double (&v)[Q]) {
    __shared__ double warp_sums[Q][THREADS / WARP];
    const int lane = threadIdx.x % WARP;
    const int warp = threadIdx.x / WARP;
#pragma unroll
    for (int q = 0; q < Q; ++q) {
#pragma unroll
        for (int off = WARP / 2; off > 0; off /= 2) v[q] += shfl_down(v[q], off);
    }
    if (lane == 0) {
#pragma unroll
        for (int q = 0; q < Q; ++q) warp_sums[q][warp] = v[q];
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int q = 0; q < Q; ++q) {
            v[q] = lane < THREADS / WARP ? warp_sums[q][lane] : 0.0;
#pragma unroll
            for (int off = THREADS / WARP / 2; off > 0; off /= 2) v[q] += shfl_down(v[q], off);
        }
    }
}

// Sum Q x VEC values over threadIdx.y of a (TX, TY) block, TY a power of two;
// the result is in the threads with threadIdx.y == 0. Fixed tree order.
template <int Q, int VEC>
__device__ __forceinline__ void column_sum(double (&v)[Q][VEC]) {
    __shared__ double buf[Q * THREADS * VEC];
    const int tx = threadIdx.x, ty = threadIdx.y, tdx = blockDim.x;
    const int slot = (ty * tdx + tx) * VEC;
#pragma unroll
    for (int q = 0; q < Q; ++q) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) buf[q * THREADS * VEC + slot + k] = v[q][k];
    }
    __syncthreads();
    for (int h = blockDim.y / 2; h > 0; h /= 2) {
        if (ty < h) {
            const int other = slot + h * tdx * VEC;
#pragma unroll
            for (int q = 0; q < Q; ++q) {
#pragma unroll
                for (int k = 0; k < VEC; ++k)
                    buf[q * THREADS * VEC + slot + k] += buf[q * THREADS * VEC + other + k];
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int q = 0; q < Q; ++q) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[q][k] = buf[q * THREADS * VEC + slot + k];
    }
}

// Walks one channel of the outer layout: position v of the channel's N * S_v
// units is plane n = v / S_v, offset s = v % S_v, memory unit (n*C + c)*S_v + s.
// Advancing by a fixed stride needs no division.
struct ChannelWalk {
    long long s, off;                   // position in the plane, memory offset (units)
    long long plane, step_s, step_off, wrap_off;

    __device__ __forceinline__ ChannelWalk(long long v, long long c, long long C,
                                           long long S_v, long long stride) {
        const long long n = v / S_v;
        s = v - n * S_v;
        off = (n * C + c) * S_v + s;
        plane = S_v;
        const long long q = stride / S_v;
        step_s = stride - q * S_v;
        step_off = q * C * S_v + step_s;
        wrap_off = (C - 1) * S_v;
    }
    __device__ __forceinline__ void next() {
        s += step_s;
        off += step_off;
        if (s >= plane) {
            s -= plane;
            off += wrap_off;
        }
    }
};

// Walks the flat index space of the outer layout in fixed strides, tracking
// the channel (i / S_v) % C without a division per step.
struct FlatWalk {
    long long s, c;                     // position in the plane, channel
    long long S_v, C, step_s, step_c;

    __device__ __forceinline__ FlatWalk(long long j, long long C_, long long S_v_,
                                        long long stride) {
        S_v = S_v_;
        C = C_;
        const long long p = j / S_v;
        s = j - p * S_v;
        c = p % C;
        const long long q = stride / S_v;
        step_s = stride - q * S_v;
        step_c = q % C;
    }
    __device__ __forceinline__ void next() {
        s += step_s;
        c += step_c;
        if (s >= S_v) {
            s -= S_v;
            c += 1;
        }
        if (c >= C) c -= C;             // c <= 2C - 1 here
    }
};

// hi + lo == value to about 2 * 24 (float) or 2 * 53 (double) bits.
template <typename T>
__device__ __forceinline__ void split_hi_lo(double value, T& hi, T& lo) {
    hi = static_cast<T>(value);
    lo = static_cast<T>(value - static_cast<double>(hi));
}

// One warp adds channel c's B partials of the three sums in a fixed order;
// lane 0 ends with the totals.
__device__ __forceinline__ void warp_sum_partials(const double* __restrict__ part, long long C,
                                                  long long B, long long c, int lane,
                                                  double (&s)[3]) {
    const long long cb = C * B;
    s[0] = s[1] = s[2] = 0.0;
    for (long long b = lane; b < B; b += WARP) {
        const long long i = c * B + b;
        s[0] += part[i];
        s[1] += part[cb + i];
        s[2] += part[2 * cb + i];
    }
#pragma unroll
    for (int q = 0; q < 3; ++q) {
#pragma unroll
        for (int off = WARP / 2; off > 0; off /= 2) s[q] += shfl_down(s[q], off);
    }
}

// A channel's count n, mean and M2 (sum of squared deviations from the mean) from
// its totals s = (sum d, sum d^2, n) of the deviations d = x - shift.
__device__ __forceinline__ void moments_from_sums(const double (&s)[3], double shift, double& n,
                                                  double& m, double& m2) {
    n = s[2];
    const double d = s[0] / n;          // mean - shift
    m = shift + d;
    m2 = s[1] - s[0] * d;
    if (m2 < 0.0) m2 = 0.0;             // rounding; NaN stays NaN
}

// ---------------------------------------------------------------------------
// statistics: per-block sums of the deviations d = x - shift from a shift that is
// the same in every block of a channel (its first value), so that finalize_* adds
// the partials (no division per merge):
// part[q * C * B + c * B + b], q = 0 sum d, 1 sum d^2, 2 count; part[3 * C * B + c]
// is channel c's shift
// ---------------------------------------------------------------------------

// grid (C, B); block b of channel c covers the channel's units [b*chunk, ...).
template <typename T, int VEC, bool ALIGNED>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS_1)
stats_outer(const T* __restrict__ x, double* __restrict__ part, long long C, long long S_v,
            long long V, long long chunk) {
    const long long c = blockIdx.x, b = blockIdx.y, B = gridDim.y;
    const long long e0 = b * chunk, e1 = lmin(e0 + chunk, V);
    // the channel's first value (image 0, position 0): every block of the channel
    // sums around it, so that the partial sums add up
    const double shift = static_cast<double>(x[c * S_v * VEC]);
    double acc[2] = {0.0, 0.0};
    long long v = e0 + threadIdx.x;
    if (v < e1) {
        ChannelWalk w(v, c, C, S_v, THREADS);
        for (; v < e1; v += UNROLL * THREADS) {
            Pack<T, VEC> a[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                if (v + u * THREADS < e1) {
                    a[u] = load<T, VEC, ALIGNED>(x + w.off * VEC);
                    w.next();
                }
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                if (v + u * THREADS < e1) {
#pragma unroll
                    for (int k = 0; k < VEC; ++k) {
                        const double d = static_cast<double>(a[u].v[k]) - shift;
                        acc[0] += d;
                        acc[1] += d * d;
                    }
                }
            }
        }
    }
    block_sum<2>(acc);
    if (threadIdx.x == 0) {
        const long long i = c * B + b, cb = C * B;
        part[i] = acc[0];
        part[cb + i] = acc[1];
        part[2 * cb + i] = static_cast<double>((e1 - e0) * VEC);
        if (b == 0) part[3 * cb + c] = shift;
    }
}

// grid (ceil(C/VEC / TX), B), block (TX, TY); block (., b) covers rows
// [b*rows, (b+1)*rows) of its TX * VEC channels.
template <typename T, int VEC, bool ALIGNED>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS_1)
stats_inner(const T* __restrict__ x, double* __restrict__ part, long long M, long long C,
            long long rows) {
    const long long cv = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long b = blockIdx.y, B = gridDim.y;
    const long long r0 = b * rows, r1 = lmin(r0 + rows, M);
    const bool active = cv < C / VEC;
    double acc[2][VEC] = {};
    double shift[VEC] = {};
    if (active) {
        // row 0: the same shift in every block of these channels (see stats_outer)
        const Pack<T, VEC> first = load<T, VEC, ALIGNED>(x + cv * VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) shift[k] = static_cast<double>(first.v[k]);
        for (long long r = r0 + threadIdx.y; r < r1; r += UNROLL * blockDim.y) {
            Pack<T, VEC> a[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const long long rr = r + static_cast<long long>(u) * blockDim.y;
                if (rr < r1) a[u] = load<T, VEC, ALIGNED>(x + rr * C + cv * VEC);
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                if (r + static_cast<long long>(u) * blockDim.y < r1) {
#pragma unroll
                    for (int k = 0; k < VEC; ++k) {
                        const double d = static_cast<double>(a[u].v[k]) - shift[k];
                        acc[0][k] += d;
                        acc[1][k] += d * d;
                    }
                }
            }
        }
    }
    column_sum<2, VEC>(acc);
    if (threadIdx.y == 0 && active) {
        const long long cb = C * B;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const long long i = (cv * VEC + k) * B + b;
            part[i] = acc[0][k];
            part[cb + i] = acc[1][k];
            part[2 * cb + i] = static_cast<double>(r1 - r0);
            if (b == 0) part[3 * cb + cv * VEC + k] = shift[k];
        }
    }
}

// One warp per channel (grid ceil(C / 8), block 256): add the B partials in a
// fixed order, then write save_mean/save_invstd, update the running stats
// (PyTorch's rule, unbiased variance, in double) and write the coefficients
// coef[q * C + c] of y = ((x - hi) - lo) * scale + shift, q = hi, lo, scale, shift.
template <typename T>
__global__ void __launch_bounds__(THREADS)
finalize_stats(const double* __restrict__ part, long long C, long long B, double eps,
               double momentum, const T* __restrict__ weight, const T* __restrict__ bias,
               T* __restrict__ save_mean, T* __restrict__ save_invstd,
               T* __restrict__ running_mean, T* __restrict__ running_var,
               T* __restrict__ coef) {
    const long long c = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / WARP;
    const int lane = threadIdx.x % WARP;
    if (c >= C) return;                 // whole warps leave together
    double s[3], n, m, m2;
    warp_sum_partials(part, C, B, c, lane, s);
    if (lane != 0) return;
    moments_from_sums(s, part[3 * C * B + c], n, m, m2);
    const double invstd = 1.0 / sqrt(m2 / n + eps);
    save_mean[c] = static_cast<T>(m);
    save_invstd[c] = static_cast<T>(invstd);
    if (running_mean != nullptr) {
        const double old = static_cast<double>(running_mean[c]);
        running_mean[c] = static_cast<T>(momentum * m + (1.0 - momentum) * old);
    }
    if (running_var != nullptr) {
        const double old = static_cast<double>(running_var[c]);
        const double unbiased = m2 / (n - 1.0);
        running_var[c] = static_cast<T>(momentum * unbiased + (1.0 - momentum) * old);
    }
    T hi, lo;
    split_hi_lo(m, hi, lo);
    const double scale = weight != nullptr ? invstd * static_cast<double>(weight[c]) : invstd;
    coef[c] = hi;
    coef[C + c] = lo;
    coef[2 * C + c] = static_cast<T>(scale);
    coef[3 * C + c] = bias != nullptr ? bias[c] : T(0);
}

// One thread per channel: coefficients for eval, from the running stats
// (invstd = 1/sqrt(var + eps)) or from a given double invstd; mean may be null (0).
template <typename T>
__global__ void __launch_bounds__(THREADS)
affine_coefs(long long C, const T* __restrict__ mean, const T* __restrict__ var,
             const double* __restrict__ invstd, double eps, const T* __restrict__ weight,
             const T* __restrict__ bias, T* __restrict__ coef) {
    const long long c = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const double m = mean != nullptr ? static_cast<double>(mean[c]) : 0.0;
    const double is = invstd != nullptr ? invstd[c]
                                        : 1.0 / sqrt(static_cast<double>(var[c]) + eps);
    const double scale = weight != nullptr ? is * static_cast<double>(weight[c]) : is;
    T hi, lo;
    split_hi_lo(m, hi, lo);
    coef[c] = hi;
    coef[C + c] = lo;
    coef[2 * C + c] = static_cast<T>(scale);
    coef[3 * C + c] = bias != nullptr ? bias[c] : T(0);
}

// ---------------------------------------------------------------------------
// elementwise: y = ((x - hi) - lo) * scale + shift
// ---------------------------------------------------------------------------

template <typename T, int VEC>
__device__ __forceinline__ void apply_affine(Pack<T, VEC>& a, const T* __restrict__ coef,
                                             long long C, long long c) {
    const T hi = coef[c], lo = coef[C + c], scale = coef[2 * C + c], shift = coef[3 * C + c];
#pragma unroll
    for (int k = 0; k < VEC; ++k) a.v[k] = ((a.v[k] - hi) - lo) * scale + shift;
}

// 1-D grid-stride loop over the N*C*S/VEC units.
template <typename T, int VEC>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS_1)
normalize_outer(const T* __restrict__ x, T* __restrict__ y, const T* __restrict__ coef,
                long long C, long long S_v, long long total) {
    const long long stride = static_cast<long long>(gridDim.x) * THREADS;
    long long j = static_cast<long long>(blockIdx.x) * THREADS + threadIdx.x;
    if (j >= total) return;
    FlatWalk w(j, C, S_v, stride);
    for (; j < total; j += UNROLL * stride) {
        Pack<T, VEC> a[UNROLL];
        long long ch[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            ch[u] = w.c;
            if (j + u * stride < total) a[u] = load<T, VEC, true>(x + (j + u * stride) * VEC);
            w.next();
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (j + u * stride < total) {
                apply_affine<T, VEC>(a[u], coef, C, ch[u]);
                store<T, VEC>(y + (j + u * stride) * VEC, a[u]);
            }
        }
    }
}

// grid (ceil(C/VEC / TX), GY), block (TX, TY): a thread keeps its VEC channels'
// coefficients in registers and strides over the rows.
template <typename T, int VEC>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS_1)
normalize_inner(const T* __restrict__ x, T* __restrict__ y, const T* __restrict__ coef,
                long long M, long long C) {
    const long long cv = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (cv >= C / VEC) return;
    const long long c0 = cv * VEC;
    const Pack<T, VEC> hi = load<T, VEC, true>(coef + c0);
    const Pack<T, VEC> lo = load<T, VEC, true>(coef + C + c0);
    const Pack<T, VEC> sc = load<T, VEC, true>(coef + 2 * C + c0);
    const Pack<T, VEC> sh = load<T, VEC, true>(coef + 3 * C + c0);
    const long long stride = static_cast<long long>(gridDim.y) * blockDim.y;
    for (long long r = static_cast<long long>(blockIdx.y) * blockDim.y + threadIdx.y; r < M;
         r += UNROLL * stride) {
        Pack<T, VEC> a[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (r + u * stride < M) a[u] = load<T, VEC, true>(x + (r + u * stride) * C + c0);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (r + u * stride < M) {
#pragma unroll
                for (int k = 0; k < VEC; ++k)
                    a[u].v[k] = ((a[u].v[k] - hi.v[k]) - lo.v[k]) * sc.v[k] + sh.v[k];
                store<T, VEC>(y + (r + u * stride) * C + c0, a[u]);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// backward reductions: part[q * C * B + c * B + b],
// q = 0 sum(dy), 1 sum(dy * (x - center)), 2 sum(x - center)
// The center has the input's type (fused backward: the saved mean) or is
// double (CT = double: SyncBatchNorm's global mean, used exactly).
// ---------------------------------------------------------------------------

template <typename T, int VEC, bool ALIGNED, typename CT = T>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS_2)
grad_sums_outer(const T* __restrict__ dy, const T* __restrict__ x, const CT* __restrict__ center,
                double* __restrict__ part, long long C, long long S_v, long long V,
                long long chunk) {
    constexpr int LOADS = wide_unroll<T, VEC>();
    const long long c = blockIdx.x, b = blockIdx.y, B = gridDim.y;
    const long long e0 = b * chunk, e1 = lmin(e0 + chunk, V);
    const double mu = static_cast<double>(center[c]);
    double acc[3] = {0.0, 0.0, 0.0};
    long long v = e0 + threadIdx.x;
    if (v < e1) {
        ChannelWalk w(v, c, C, S_v, THREADS);
        for (; v < e1; v += LOADS * THREADS) {
            Pack<T, VEC> g[LOADS], a[LOADS];
#pragma unroll
            for (int u = 0; u < LOADS; ++u) {
                if (v + u * THREADS < e1) {
                    g[u] = load<T, VEC, ALIGNED>(dy + w.off * VEC);
                    a[u] = load<T, VEC, ALIGNED>(x + w.off * VEC);
                    w.next();
                }
            }
#pragma unroll
            for (int u = 0; u < LOADS; ++u) {
                if (v + u * THREADS < e1) {
#pragma unroll
                    for (int k = 0; k < VEC; ++k) {
                        const double d = static_cast<double>(g[u].v[k]);
                        const double e = static_cast<double>(a[u].v[k]) - mu;
                        acc[0] += d;
                        acc[1] += d * e;
                        acc[2] += e;
                    }
                }
            }
        }
    }
    block_sum<3>(acc);
    if (threadIdx.x == 0) {
        const long long i = c * B + b, cb = C * B;
        part[i] = acc[0];
        part[cb + i] = acc[1];
        part[2 * cb + i] = acc[2];
    }
}

template <typename T, int VEC, bool ALIGNED, typename CT = T>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS_2)
grad_sums_inner(const T* __restrict__ dy, const T* __restrict__ x, const CT* __restrict__ center,
                double* __restrict__ part, long long M, long long C, long long rows) {
    constexpr int LOADS = wide_unroll<T, VEC>();
    const long long cv = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long b = blockIdx.y, B = gridDim.y;
    const long long r0 = b * rows, r1 = lmin(r0 + rows, M);
    const bool active = cv < C / VEC;
    double acc[3][VEC] = {};
    double mu[VEC] = {};
    if (active) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) mu[k] = static_cast<double>(center[cv * VEC + k]);
        for (long long r = r0 + threadIdx.y; r < r1; r += LOADS * blockDim.y) {
            Pack<T, VEC> g[LOADS], a[LOADS];
#pragma unroll
            for (int u = 0; u < LOADS; ++u) {
                const long long rr = r + static_cast<long long>(u) * blockDim.y;
                if (rr < r1) {
                    g[u] = load<T, VEC, ALIGNED>(dy + rr * C + cv * VEC);
                    a[u] = load<T, VEC, ALIGNED>(x + rr * C + cv * VEC);
                }
            }
#pragma unroll
            for (int u = 0; u < LOADS; ++u) {
                if (r + static_cast<long long>(u) * blockDim.y < r1) {
#pragma unroll
                    for (int k = 0; k < VEC; ++k) {
                        const double d = static_cast<double>(g[u].v[k]);
                        const double e = static_cast<double>(a[u].v[k]) - mu[k];
                        acc[0][k] += d;
                        acc[1][k] += d * e;
                        acc[2][k] += e;
                    }
                }
            }
        }
    }
    column_sum<3, VEC>(acc);
    if (threadIdx.y == 0 && active) {
        const long long cb = C * B;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const long long i = (cv * VEC + k) * B + b;
            part[i] = acc[0][k];
            part[cb + i] = acc[1][k];
            part[2 * cb + i] = acc[2][k];
        }
    }
}

// One warp per channel: add the B partials in a fixed order; write grad_weight
// and grad_bias (when non-null) and the grad_input coefficients:
//   training  coef[q*C + c], q = hi, lo, k, mdy, a  for
//             gx = (dy - mdy - ((x - hi) - lo) * a) * k, with the mean refined
//             from x: true mean = center + sum(x - center) / count
//   eval      coef = (0, 0, k, 0) for normalize_*: gx = dy * k
// where k = invstd * weight. invstd comes as T (training) or double (eval).
template <typename T>
__global__ void __launch_bounds__(THREADS)
finalize_grad(const double* __restrict__ part, long long C, long long B, double count,
              long long training, const T* __restrict__ center,
              const T* __restrict__ invstd_t, const double* __restrict__ invstd_d,
              const T* __restrict__ weight, T* __restrict__ grad_weight,
              T* __restrict__ grad_bias, T* __restrict__ coef) {
    const long long c = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / WARP;
    const int lane = threadIdx.x % WARP;
    if (c >= C) return;                 // whole warps leave together
    double s[3];
    warp_sum_partials(part, C, B, c, lane, s);
    if (lane != 0) return;
    double sum_dy = s[0], sum_dyx = s[1];
    double mu = static_cast<double>(center[c]);
    const double is = invstd_t != nullptr ? static_cast<double>(invstd_t[c]) : invstd_d[c];
    if (training) {
        const double offset = s[2] / count;     // true mean - center
        mu = mu + offset;
        sum_dyx = sum_dyx - offset * sum_dy;    // sum(dy * (x - true mean))
    }
    const double k = weight != nullptr ? is * static_cast<double>(weight[c]) : is;
    if (training) {
        T hi, lo;
        split_hi_lo(mu, hi, lo);
        coef[c] = hi;
        coef[C + c] = lo;
        coef[2 * C + c] = static_cast<T>(k);
        coef[3 * C + c] = static_cast<T>(sum_dy / count);
        coef[4 * C + c] = static_cast<T>(sum_dyx * is * is / count);
    } else {
        coef[c] = T(0);
        coef[C + c] = T(0);
        coef[2 * C + c] = static_cast<T>(k);
        coef[3 * C + c] = T(0);
    }
    if (grad_weight != nullptr) grad_weight[c] = static_cast<T>(sum_dyx * is);
    if (grad_bias != nullptr) grad_bias[c] = static_cast<T>(sum_dy);
}

// ---------------------------------------------------------------------------
// step-by-step building blocks (SyncBatchNorm): per-channel double values
// ---------------------------------------------------------------------------

// One warp per channel (grid ceil(C / 8), block 256): add the B partials of
// stats_* (moments != 0: out = mean, M2, count) or of grad_sums_* (moments == 0:
// out = sum dy, sum dy * (x - center), sum (x - center)) in the fixed order of
// finalize_stats / finalize_grad; out[q * C + c], double.
__global__ void __launch_bounds__(THREADS)
finalize_partials(const double* __restrict__ part, long long C, long long B,
                  long long moments, double* __restrict__ out) {
    const long long c = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / WARP;
    const int lane = threadIdx.x % WARP;
    if (c >= C) return;                 // whole warps leave together
    double s[3];
    warp_sum_partials(part, C, B, c, lane, s);
    if (lane != 0) return;
    if (moments) {
        double n, m, m2;
        moments_from_sums(s, part[3 * C * B + c], n, m, m2);
        s[0] = m;
        s[1] = m2;
        s[2] = n;
    }
    out[c] = s[0];
    out[C + c] = s[1];
    out[2 * C + c] = s[2];
}

// One thread per channel: coefficients from double batch statistics, with
// k = invstd * weight (invstd when weight is null):
//   sum_dy == null  normalize_*:  coef = (hi, lo, k, bias or 0)
//   otherwise       grad_input_*: coef = (hi, lo, k, sum_dy / count,
//                                         sum_dyx * invstd^2 / count)
// where hi + lo is the mean; count and the sums may cover several processes.
template <typename T>
__global__ void __launch_bounds__(THREADS)
coefs_from_stats(long long C, const double* __restrict__ mean, const double* __restrict__ invstd,
                 const T* __restrict__ weight, const T* __restrict__ bias,
                 const double* __restrict__ sum_dy, const double* __restrict__ sum_dyx,
                 double count, T* __restrict__ coef) {
    const long long c = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const double is = invstd[c];
    const double k = weight != nullptr ? is * static_cast<double>(weight[c]) : is;
    T hi, lo;
    split_hi_lo(mean[c], hi, lo);
    coef[c] = hi;
    coef[C + c] = lo;
    coef[2 * C + c] = static_cast<T>(k);
    if (sum_dy == nullptr) {
        coef[3 * C + c] = bias != nullptr ? bias[c] : T(0);
    } else {
        coef[3 * C + c] = static_cast<T>(sum_dy[c] / count);
        coef[4 * C + c] = static_cast<T>(sum_dyx[c] * is * is / count);
    }
}

// ---------------------------------------------------------------------------
// grad_input (training): gx = (dy - mdy - ((x - hi) - lo) * a) * k
// ---------------------------------------------------------------------------

template <typename T, int VEC>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS_2)
grad_input_outer(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ gx,
                 const T* __restrict__ coef, long long C, long long S_v, long long total) {
    const long long stride = static_cast<long long>(gridDim.x) * THREADS;
    long long j = static_cast<long long>(blockIdx.x) * THREADS + threadIdx.x;
    if (j >= total) return;
    FlatWalk w(j, C, S_v, stride);
    for (; j < total; j += UNROLL * stride) {
        Pack<T, VEC> g[UNROLL], a[UNROLL];
        long long ch[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            ch[u] = w.c;
            if (j + u * stride < total) {
                g[u] = load<T, VEC, true>(dy + (j + u * stride) * VEC);
                a[u] = load<T, VEC, true>(x + (j + u * stride) * VEC);
            }
            w.next();
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (j + u * stride < total) {
                const long long c = ch[u];
                const T hi = coef[c], lo = coef[C + c], k = coef[2 * C + c];
                const T mdy = coef[3 * C + c], am = coef[4 * C + c];
#pragma unroll
                for (int q = 0; q < VEC; ++q)
                    g[u].v[q] = (g[u].v[q] - mdy - ((a[u].v[q] - hi) - lo) * am) * k;
                store<T, VEC>(gx + (j + u * stride) * VEC, g[u]);
            }
        }
    }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS_2)
grad_input_inner(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ gx,
                 const T* __restrict__ coef, long long M, long long C) {
    const long long cv = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (cv >= C / VEC) return;
    const long long c0 = cv * VEC;
    const Pack<T, VEC> hi = load<T, VEC, true>(coef + c0);
    const Pack<T, VEC> lo = load<T, VEC, true>(coef + C + c0);
    const Pack<T, VEC> k = load<T, VEC, true>(coef + 2 * C + c0);
    const Pack<T, VEC> mdy = load<T, VEC, true>(coef + 3 * C + c0);
    const Pack<T, VEC> am = load<T, VEC, true>(coef + 4 * C + c0);
    const long long stride = static_cast<long long>(gridDim.y) * blockDim.y;
    for (long long r = static_cast<long long>(blockIdx.y) * blockDim.y + threadIdx.y; r < M;
         r += UNROLL * stride) {
        Pack<T, VEC> g[UNROLL], a[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (r + u * stride < M) {
                g[u] = load<T, VEC, true>(dy + (r + u * stride) * C + c0);
                a[u] = load<T, VEC, true>(x + (r + u * stride) * C + c0);
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (r + u * stride < M) {
#pragma unroll
                for (int q = 0; q < VEC; ++q)
                    g[u].v[q] = (g[u].v[q] - mdy.v[q] - ((a[u].v[q] - hi.v[q]) - lo.v[q]) * am.v[q])
                                * k.v[q];
                store<T, VEC>(gx + (r + u * stride) * C + c0, g[u]);
            }
        }
    }
}

}  // namespace fastbn
