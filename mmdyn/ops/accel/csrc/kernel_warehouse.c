/* KernelWarehouse's cell product: a register-blocked a @ b for few rows and
   many columns (mmdyn/ops/accel/kw_cells.py). */
#include "winograd_transform.h"
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#define MR 4
#define NR 24

/* Where C's rows and columns go. Row r starts at out + rows[r] (out + r * N
   when rows is NULL); column j lands at (j / seg) * seg_stride + j % seg
   from there: seg = seg_stride = N is plain row-major, while seg = c_i,
   seg_stride = C_in writes a [c_o, c_i] cell into its place in a
   [C_out, C_in] matrix. */
typedef struct {
    float *out;
    const long *rows;
    long N, seg, seg_stride;
} layout_t;

/* Column j of a row lands at col_offset(L, j) from the row's start. */
static long col_offset(const layout_t *L, long j) {
    return (j / L->seg) * L->seg_stride + j % L->seg;
}

static float *row_start(const layout_t *L, long r) {
    return L->out + (L->rows ? L->rows[r] : r * L->N);
}

/* The general store of rows 0..mr, columns c0..c0+nr of a tile (edge tiles
   and strips that cross a segment). */
static void store_tile(const layout_t *L, float tile[MR][NR], long r0,
                       long mr, long c0, long nr) {
    for (long r = 0; r < mr; ++r) {
        float *row = row_start(L, r0 + r);
        for (long q = 0; q < nr;) {
            const long within = (c0 + q) % L->seg;
            long len = L->seg - within;
            if (len > nr - q) len = nr - q;
            memcpy(row + col_offset(L, c0 + q), tile[r] + q,
                   len * sizeof(float));
            q += len;
        }
    }
}

/* ap [K][MR] (packed rows) x bp [K][NR] (packed columns). With `dst`, a
   whole tile whose rows start at dst[0..MR-1] is stored straight from the
   registers (a copy through `tile` cost ~10 % at K = 47); otherwise into
   `tile`. */
static void tile_4x24(const float *ap, const float *bp, long K,
                      float *const *dst, float tile[MR][NR]) {
#if defined(__AVX2__) && defined(__FMA__)
    /* Twelve named accumulators: an array of vectors indexed in loops is
       not reliably kept in registers. 4 x 24 beat 6 x 16 by 17 % on the
       ResNet-50 assembly shapes (no padded rows for B * m = 32, 36, 72:
       multiples of 4; three loads per four broadcasts). */
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00;
    __m256 c10 = c00, c11 = c00, c12 = c00, c20 = c00, c21 = c00;
    __m256 c22 = c00, c30 = c00, c31 = c00, c32 = c00;
#define KW_ROW(r, x0, x1, x2)                                  \
    a = _mm256_broadcast_ss(ap + k * MR + r);                  \
    x0 = _mm256_fmadd_ps(a, b0, x0);                           \
    x1 = _mm256_fmadd_ps(a, b1, x1);                           \
    x2 = _mm256_fmadd_ps(a, b2, x2);
    for (long k = 0; k < K; ++k) {
        const __m256 b0 = _mm256_loadu_ps(bp + k * NR);
        const __m256 b1 = _mm256_loadu_ps(bp + k * NR + 8);
        const __m256 b2 = _mm256_loadu_ps(bp + k * NR + 16);
        __m256 a;
        KW_ROW(0, c00, c01, c02) KW_ROW(1, c10, c11, c12)
        KW_ROW(2, c20, c21, c22) KW_ROW(3, c30, c31, c32)
    }
#undef KW_ROW
#define KW_STORE(r, x0, x1, x2)                                            \
    if (!dst) {                                                            \
        _mm256_storeu_ps(tile[r], x0); _mm256_storeu_ps(tile[r] + 8, x1);  \
        _mm256_storeu_ps(tile[r] + 16, x2);                                \
    } else {                                                               \
        _mm256_storeu_ps(dst[r], x0); _mm256_storeu_ps(dst[r] + 8, x1);    \
        _mm256_storeu_ps(dst[r] + 16, x2);                                 \
    }
    KW_STORE(0, c00, c01, c02) KW_STORE(1, c10, c11, c12)
    KW_STORE(2, c20, c21, c22) KW_STORE(3, c30, c31, c32)
#undef KW_STORE
#else
    memset(tile, 0, sizeof(float) * MR * NR);
    for (long k = 0; k < K; ++k)
        for (int r = 0; r < MR; ++r)
            for (int q = 0; q < NR; ++q)
                tile[r][q] += ap[k * MR + r] * bp[k * NR + q];
    if (dst)
        for (int r = 0; r < MR; ++r) memcpy(dst[r], tile[r], sizeof(tile[r]));
#endif
}

/* Columns c0..c0 + NR of C = A @ B (packed A panels `ap`, packed strip
   `bs`) into `strip`, then the Winograd transform of each sample's 9 rows
   into out [M / 9, 16, N]. */
static void winograd_strip(const float *ap, const float *bs, float *strip,
                           float *out, long M, long K, long N, long c0,
                           float tile[MR][NR]) {
    const long panels = (M + MR - 1) / MR;
    const long w = (N - c0) < NR ? (N - c0) : NR;
    for (long g = 0; g < panels; ++g) {
        const long mr = (M - g * MR) < MR ? (M - g * MR) : MR;
        float *first = strip + g * MR * NR;
        if (mr == MR) {
            float *dst[MR] = {first, first + NR, first + 2 * NR,
                              first + 3 * NR};
            tile_4x24(ap + g * K * MR, bs, K, dst, tile);
        } else {
            tile_4x24(ap + g * K * MR, bs, K, NULL, tile);
            memcpy(first, tile, (size_t)(mr * NR) * sizeof(float));
        }
    }
    for (long b = 0; b < M / 9; ++b) {
        const float *k = strip + b * 9 * NR;
        float *o = out + b * 16 * N + c0;
        #pragma omp simd
        for (long n = 0; n < w; ++n) {
            WINOGRAD_STORE(o, N, n, k[n], k[NR + n], k[2 * NR + n],
                           k[3 * NR + n], k[4 * NR + n], k[5 * NR + n],
                           k[6 * NR + n], k[7 * NR + n], k[8 * NR + n]);
        }
    }
}

/* Strip s of B [K, N] (columns s*NR..) as [K][NR], zero-padded. */
static void pack_strip(const float *B, long K, long N, long s, float *dst) {
    const long c0 = s * NR;
    const long w = (N - c0) < NR ? (N - c0) : NR;
    if (w == NR) {
        /* A constant size: two vector moves, no call. */
        for (long k = 0; k < K; ++k)
            memcpy(dst + k * NR, B + k * N + c0, NR * 4);
    } else {
        for (long k = 0; k < K; ++k)
            for (long q = 0; q < NR; ++q)
                dst[k * NR + q] = q < w ? B[k * N + c0 + q] : 0.0f;
    }
}

/* Bp [ceil(N / NR)][K][NR] = B [K, N] cut into zero-padded strips. */
void pack_columns_f32(const float *B, float *Bp, long K, long N,
                      int threads) {
    const long strips = (N + NR - 1) / NR;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long s = 0; s < strips; ++s) pack_strip(B, K, N, s, Bp + s * K * NR);
}

/* C = A [M, K] @ B [K, N] (row-major, contiguous), stored as `L` says.
   `Bp`, when not NULL, is B already cut by pack_columns_f32 (then B is not
   read); otherwise each thread packs a block of strips that fits the L1
   cache. With `winograd`, the rows of C are M / 9 3x3 kernels (rows 9b ..
   9b + 8: the kernel positions of sample b, each column one kernel) and
   out receives their Winograd transforms G w G^T, [M / 9, 16, N]: a strip
   of C is kept in a buffer and transformed there (`rows`, `seg` and
   `seg_stride` unused). Returns 0, or -1 when out of memory (out is then
   not written). */
int small_rows_matmul_f32(const float *A, const float *B, const float *Bp,
                          float *out, long M, long K, long N,
                          const long *rows, long seg, long seg_stride,
                          int winograd, int threads) {
    const layout_t L = {out, rows, N, seg, seg_stride};
    const long panels = (M + MR - 1) / MR;
    const long strips = (N + NR - 1) / NR;
    float *ap = calloc((size_t)(panels * MR * K), sizeof(float));
    if (!ap) return -1;
    for (long g = 0; g < panels; ++g)
        for (long r = 0; r < MR && g * MR + r < M; ++r)
            for (long k = 0; k < K; ++k)
                ap[(g * K + k) * MR + r] = A[(g * MR + r) * K + k];
    /* Strips per block: about 32 KB packed. */
    long per_block = 32768 / (K * 4 * NR);
    if (per_block < 1) per_block = 1;
    const long blocks = (strips + per_block - 1) / per_block;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        /* 64-byte aligned: unaligned 32-byte loads that straddle cache
           lines cost a third of the speed here. */
        char *raw = malloc((Bp ? 0 : (size_t)(per_block * K * NR) *
                            sizeof(float)) + 64);
        float *bp = (float *)(((uintptr_t)raw + 63) & ~(uintptr_t)63);
        long *offsets = malloc((size_t)per_block * sizeof(long));
        /* winograd: one strip of C, [panels * MR][NR] */
        float *strip = winograd ?
            malloc((size_t)(panels * MR * NR) * sizeof(float)) : NULL;
        if (!raw || !offsets || (winograd && !strip)) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp barrier
        if (!failed) {
            float tile[MR][NR];
            #pragma omp for schedule(static)
            for (long blk = 0; blk < blocks; ++blk) {
                const long s0 = blk * per_block;
                const long s1 = (s0 + per_block) < strips ?
                    (s0 + per_block) : strips;
                const float *block = Bp ? Bp + s0 * K * NR : bp;
                if (!Bp)
                    for (long s = s0; s < s1; ++s)
                        pack_strip(B, K, N, s, bp + (s - s0) * K * NR);
                if (winograd) {
                    for (long s = s0; s < s1; ++s)
                        winograd_strip(ap, block + (s - s0) * K * NR, strip,
                                       out, M, K, N, s * NR, tile);
                    continue;
                }
                /* Each strip's offset in a row; -1 where the strip is
                   partial or crosses a segment (general store). */
                for (long s = s0; s < s1; ++s) {
                    const long c0 = s * NR;
                    offsets[s - s0] = (c0 + NR <= N &&
                                       c0 % seg + NR <= seg) ?
                        col_offset(&L, c0) : -1;
                }
                for (long g = 0; g < panels; ++g) {
                    const long mr = (M - g * MR) < MR ? (M - g * MR) : MR;
                    float *row[MR];
                    for (long r = 0; r < mr; ++r)
                        row[r] = row_start(&L, g * MR + r);
                    for (long s = s0; s < s1; ++s) {
                        const long c0 = s * NR;
                        const float *bs = block + (s - s0) * K * NR;
                        const long off = offsets[s - s0];
                        if (mr == MR && off >= 0) {
                            float *dst[MR] = {row[0] + off, row[1] + off,
                                              row[2] + off, row[3] + off};
                            tile_4x24(ap + g * K * MR, bs, K, dst, tile);
                        } else {
                            tile_4x24(ap + g * K * MR, bs, K, NULL, tile);
                            store_tile(&L, tile, g * MR, mr, c0,
                                       (N - c0) < NR ? (N - c0) : NR);
                        }
                    }
                }
            }
        }
        free(raw);
        free(offsets);
        free(strip);
    }
    free(ap);
    return failed ? -1 : 0;
}
