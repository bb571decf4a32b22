/* The weighted sum of shifted tap maps of a one-kernel ODConv layer
   (mmdyn/ops/accel/tap_sum_cpu.py), in float32 (_f32) and float64 (_f64).

   out[b, o, i, j] = bias[o]
       + sum_t scale[b, s_t, o] * z[base_t + ((b * h_t + i + qy_t) * w_t
                                             + j + qx_t) * pix_t + o]

   over the taps t whose pixel (i + qy_t, j + qx_t) lies inside their
   h_t x w_t sub-image. z holds the 1x1 GEMM outputs pixel-major (each
   pixel's taps, each tap's C channels); taps[t] = {base_t, pix_t, h_t, w_t,
   qy_t, qx_t, s_t}. One output row (b, i) per iteration: its W_out x C sums
   in a thread's buffer, then written transposed into the [B, C, H_out,
   W_out] output. Returns -1 when a row buffer cannot be allocated.

   tap_sum_backward: the gradients of that sum over ONE sub-image (h x w
   pixels of pix elements, z and gz its maps, taps[t] = {offset of the
   tap's C channels in a pixel, qy_t, qx_t, s_t}) for the output gradient g,
   pixel-major [B, H_out, W_out, C]: every slot of gz is written, the
   slot of tap t at pixel (y, x) with scale[b, s_t, o] * g[b, y - qy_t,
   x - qx_t, o], or 0 where that output pixel does not exist; when z is
   given, gscale[b, s, o] (zeroed by the caller) gets the sum over the taps
   t with s_t = s and the pixels of z[slot] * g[...] (each thread sums
   into a buffer of its own, added up in thread order at the end). Returns
   -1 when those buffers cannot be allocated. */
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#define THREAD_INDEX omp_get_thread_num()
#else
#define THREAD_INDEX 0
#endif

#define TAP_FIELDS 7
#define CLASS_TAP_FIELDS 4

/* 512-bit vectors where the CPU has them (the library is built preferring
   256-bit ones, see c_library.py): the sum over C channels runs 1.25x
   faster with them on AVX-512 (2026-12-06, 256 channels, 14x14, batch 8). */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 8 &&              \
    (defined(__x86_64__) || defined(__i386__))
#define WIDE_VECTORS __attribute__((target("prefer-vector-width=512")))
#else
#define WIDE_VECTORS
#endif

#define DEFINE_TAP_SUM(T, SUF)                                                \
WIDE_VECTORS int tap_sum##SUF(                                                \
    const T *restrict z, const int64_t *restrict taps, long n_taps,           \
    const T *restrict scale, long n_scales, const T *restrict bias,           \
    T *restrict out, long B, long C, long Ho, long Wo, int threads)           \
{                                                                             \
    int failed = 0;                                                           \
    _Pragma("omp parallel num_threads(threads)")                              \
    {                                                                         \
        T *row = malloc(sizeof(T) * (size_t)(Wo * C));                        \
        if (!row) {                                                           \
            _Pragma("omp atomic write")                                       \
            failed = 1;                                                       \
        }                                                                     \
        _Pragma("omp for collapse(2) schedule(static)")                       \
        for (long b = 0; b < B; ++b)                                          \
            for (long i = 0; i < Ho; ++i) {                                   \
                if (!row)                                                     \
                    continue;                                                 \
                const T *sb = scale + b * n_scales * C;                       \
                for (long j = 0; j < Wo; ++j) {                               \
                    T *restrict acc = row + j * C;                            \
                    _Pragma("omp simd")                                       \
                    for (long o = 0; o < C; ++o)                              \
                        acc[o] = 0;                                           \
                    for (long t = 0; t < n_taps; ++t) {                       \
                        const int64_t *g = taps + t * TAP_FIELDS;             \
                        long y = i + g[4], x = j + g[5];                      \
                        if (y < 0 || y >= g[2] || x < 0 || x >= g[3])         \
                            continue;                                         \
                        const T *restrict zp =                                \
                            z + g[0] + ((b * g[2] + y) * g[3] + x) * g[1];    \
                        const T *restrict s = sb + g[6] * C;                  \
                        _Pragma("omp simd")                                   \
                        for (long o = 0; o < C; ++o)                          \
                            acc[o] += s[o] * zp[o];                           \
                    }                                                         \
                }                                                             \
                T *ob = out + (b * C * Ho + i) * Wo;                          \
                for (long o = 0; o < C; ++o) {                                \
                    T bo = bias ? bias[o] : 0;                                \
                    T *dst = ob + o * Ho * Wo;                                \
                    for (long j = 0; j < Wo; ++j)                             \
                        dst[j] = row[j * C + o] + bo;                         \
                }                                                             \
            }                                                                 \
        free(row);                                                            \
    }                                                                         \
    return failed ? -1 : 0;                                                   \
}

#define DEFINE_TAP_SUM_BACKWARD(T, SUF)                                       \
WIDE_VECTORS int tap_sum_backward##SUF(                                       \
    const T *restrict z, const int64_t *restrict taps, long n_taps,           \
    const T *restrict scale, long n_scales, const T *restrict g,              \
    T *restrict gz, T *restrict gscale, long B, long C, long Ho, long Wo,     \
    long h, long w, long pix, int threads)                                    \
{                                                                             \
    const long n_gscale = B * n_scales * C;                                   \
    /* One zeroed buffer per thread, added up in thread order after the       \
       loop: the same sums in the same order on every run. */                 \
    T *parts = NULL;                                                          \
    if (z) {                                                                  \
        parts = calloc((size_t)threads * (size_t)n_gscale, sizeof(T));        \
        if (!parts)                                                           \
            return -1;                                                        \
    }                                                                         \
    _Pragma("omp parallel num_threads(threads)")                              \
    {                                                                         \
        T *gs = parts ? parts + (long)THREAD_INDEX * n_gscale : NULL;         \
        _Pragma("omp for collapse(2) schedule(static)")                       \
        for (long b = 0; b < B; ++b)                                          \
            for (long y = 0; y < h; ++y) {                                    \
                const T *sb = scale + b * n_scales * C;                       \
                for (long x = 0; x < w; ++x) {                                \
                    long slot0 = ((b * h + y) * w + x) * pix;                 \
                    for (long t = 0; t < n_taps; ++t) {                       \
                        const int64_t *q = taps + t * CLASS_TAP_FIELDS;       \
                        long i = y - q[1], j = x - q[2];                      \
                        T *restrict gzp = gz + slot0 + q[0];                  \
                        if (i < 0 || i >= Ho || j < 0 || j >= Wo) {           \
                            for (long o = 0; o < C; ++o)                      \
                                gzp[o] = 0;                                   \
                            continue;                                         \
                        }                                                     \
                        const T *restrict gp =                                \
                            g + ((b * Ho + i) * Wo + j) * C;                  \
                        const T *restrict s = sb + q[3] * C;                  \
                        _Pragma("omp simd")                                   \
                        for (long o = 0; o < C; ++o)                          \
                            gzp[o] = s[o] * gp[o];                            \
                        if (z) {                                              \
                            const T *restrict zp = z + slot0 + q[0];          \
                            T *restrict acc = gs + (b * n_scales + q[3]) * C; \
                            _Pragma("omp simd")                               \
                            for (long o = 0; o < C; ++o)                      \
                                acc[o] += zp[o] * gp[o];                      \
                        }                                                     \
                    }                                                         \
                }                                                             \
            }                                                                 \
    }                                                                         \
    for (long t = 0; parts && t < threads; ++t)                               \
        for (long k = 0; k < n_gscale; ++k)                                   \
            gscale[k] += parts[t * n_gscale + k];                             \
    free(parts);                                                              \
    return 0;                                                                 \
}

DEFINE_TAP_SUM(float, _f32)
DEFINE_TAP_SUM(double, _f64)
DEFINE_TAP_SUM_BACKWARD(float, _f32)
DEFINE_TAP_SUM_BACKWARD(double, _f64)
