/* Winograd F(2x2, 3x3) for per-sample 3x3 kernels: the kernel, input and
   output transforms (mmdyn/ops/accel/winograd.py). */
#include <stdlib.h>
#include <string.h>
#define CHUNK 512
#include "winograd_transform.h"
/* out[b, 4u+v, n] = (G w G^T)[u][v] with the 3x3 kernel
   w[j] = S[b, j] * sum_k A[b, k] * W[k, n, j]  (j = 3 * row + col)
   W: [K, N, 9], A: [B, K] (NULL: K == 1, weight 1), S: [B, 9] (NULL: 1),
   out: [B, 16, N]. A block of CHUNK kernels of one sample per task: the
   mixture is summed contiguously, de-interleaved into 9 rows, transformed
   with G's 0 / 1 / 0.5 entries as adds, and stored as 16 rows. */
void winograd_kernels_f32(const float *W, const float *A, const float *S,
                          float *out, long B, long K, long N, int threads) {
    const long chunks = (N + CHUNK - 1) / CHUNK;
    #pragma omp parallel for schedule(static) num_threads(threads) collapse(2)
    for (long c = 0; c < chunks; ++c) {
        for (long b = 0; b < B; ++b) {
            const long n0 = c * CHUNK;
            const long len = (N - n0) < CHUNK ? (N - n0) : CHUNK;
            float mixed[9 * CHUNK];
            float w[9][CHUNK];
            const float a0 = A ? A[b * K] : 1.0f;
            const float *src = W + n0 * 9;
            #pragma omp simd
            for (long q = 0; q < 9 * len; ++q) mixed[q] = a0 * src[q];
            for (long k = 1; k < K; ++k) {
                const float ak = A[b * K + k];
                const float *srck = W + (k * N + n0) * 9;
                #pragma omp simd
                for (long q = 0; q < 9 * len; ++q) mixed[q] += ak * srck[q];
            }
            for (long j = 0; j < 9; ++j) {
                const float sj = S ? S[b * 9 + j] : 1.0f;
                for (long n = 0; n < len; ++n) w[j][n] = sj * mixed[9 * n + j];
            }
            float *o = out + b * 16 * N + n0;
            #pragma omp simd
            for (long n = 0; n < len; ++n) {
                WINOGRAD_STORE(o, N, n, w[0][n], w[1][n], w[2][n], w[3][n],
                               w[4][n], w[5][n], w[6][n], w[7][n], w[8][n]);
            }
        }
    }
}

/* The same transform for per-sample kernels stored in KernelWarehouse's
   mixture layout, mix: [B, 9, GO, GI, CO, CI] (position, output block,
   input block, cell); out: [B, 16, GO * CO, GI * CI]. One output row (b,
   output channel) per task; runs of CI contiguous elements. */
void winograd_blocks_f32(const float *mix, float *out, long B, long GO,
                         long GI, long CO, long CI, int threads) {
    const long cout = GO * CO, cin = GI * CI, N = cout * cin;
    const long block = GO * GI * CO * CI;  /* one kernel position */
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long row = 0; row < B * cout; ++row) {
        const long b = row / cout, o = row % cout, og = o / CO, oc = o % CO;
        for (long ig = 0; ig < GI; ++ig) {
            const float *src = mix + b * 9 * block +
                               ((og * GI + ig) * CO + oc) * CI;
            float *dst = out + b * 16 * N + o * cin + ig * CI;
            #pragma omp simd
            for (long n = 0; n < CI; ++n) {
                WINOGRAD_STORE(dst, N, n, src[n], src[block + n],
                               src[2 * block + n], src[3 * block + n],
                               src[4 * block + n], src[5 * block + n],
                               src[6 * block + n], src[7 * block + n],
                               src[8 * block + n]);
            }
        }
    }
}

/* V[b, 4i + j, c, ty * TW + tx] = (B^T d B)[i][j] for the 4x4 tile d of
   x[b, c] whose corner is at (2 ty - ph, 2 tx - pw), zero outside x.
   x: [B, C, H, W]; V: [B, 16, C, TH * TW]. B^T = [[1, 0, -1, 0], [0, 1, 1,
   0], [0, -1, 1, 0], [0, 1, 0, -1]]. Per plane and tile row: each of the 4
   input rows is split into even and odd columns (tile tx starts at even
   column tx), transformed along the row for all tiles at once, then the 4
   rows are combined; every loop runs over contiguous tiles. */
int winograd_input_f32(const float *x, float *V, long B, long C, long H,
                       long W, long ph, long pw, long TH, long TW,
                       int threads) {
    const long T = TH * TW;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        /* even[TW + 1], odd[TW + 1], rows[4 input rows][4][TW] */
        float *buf = malloc(sizeof(float) * (2 * (TW + 1) + 16 * TW));
        if (!buf) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp barrier
        if (!failed) {
            float *even = buf, *odd = buf + TW + 1, *rows = buf + 2 * (TW + 1);
            #pragma omp for schedule(static)
            for (long plane = 0; plane < B * C; ++plane) {
                const long b = plane / C, c = plane % C;
                const float *src = x + plane * H * W;
                float *dst = V + (b * 16 * C + c) * T;
                for (long ty = 0; ty < TH; ++ty) {
                    for (long r = 0; r < 4; ++r) {
                        float *ct = rows + r * 4 * TW;
                        const long y = 2 * ty + r - ph;
                        if (y < 0 || y >= H) {
                            memset(ct, 0, sizeof(float) * 4 * TW);
                            continue;
                        }
                        const float *line = src + y * W;
                        for (long k = 0; k <= TW; ++k) {
                            const long col = 2 * k - pw;
                            even[k] = (col >= 0 && col < W) ? line[col] : 0.0f;
                            odd[k] = (col + 1 >= 0 && col + 1 < W) ?
                                line[col + 1] : 0.0f;
                        }
                        #pragma omp simd
                        for (long t = 0; t < TW; ++t) {
                            ct[t] = even[t] - even[t + 1];
                            ct[TW + t] = odd[t] + even[t + 1];
                            ct[2 * TW + t] = even[t + 1] - odd[t];
                            ct[3 * TW + t] = odd[t] - odd[t + 1];
                        }
                    }
                    for (long j = 0; j < 4; ++j) {
                        const float *d0 = rows + j * TW, *d1 = d0 + 4 * TW;
                        const float *d2 = d1 + 4 * TW, *d3 = d2 + 4 * TW;
                        float *o = dst + ty * TW;
                        const long step = 4 * C * T;  /* from i to i + 1 */
                        #pragma omp simd
                        for (long t = 0; t < TW; ++t) {
                            o[j * C * T + t] = d0[t] - d2[t];
                            o[j * C * T + step + t] = d1[t] + d2[t];
                            o[j * C * T + 2 * step + t] = d2[t] - d1[t];
                            o[j * C * T + 3 * step + t] = d1[t] - d3[t];
                        }
                    }
                }
            }
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

/* out[b, c, 2 ty + a, 2 tx + e] = (A^T m A)[a][e] for the 4x4 tile m =
   M[b, :, c, ty * TW + tx] (16 entries, row-major), cropped to OH x OW.
   A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]. M: [B, 16, C, TH * TW]. */
int winograd_output_f32(const float *M, float *out, long B, long C,
                        long OH, long OW, long TH, long TW, int threads) {
    const long T = TH * TW;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        float *buf = malloc(sizeof(float) * 8 * TW);  /* rows[2][4][TW] */
        if (!buf) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp barrier
        if (!failed) {
            #pragma omp for schedule(static)
            for (long plane = 0; plane < B * C; ++plane) {
                const long b = plane / C, c = plane % C;
                const float *src = M + (b * 16 * C + c) * T;
                float *dst = out + plane * OH * OW;
                for (long ty = 0; ty < TH; ++ty) {
                    for (long j = 0; j < 4; ++j) {
                        const float *m0 = src + j * C * T + ty * TW;
                        const float *m1 = m0 + 4 * C * T, *m2 = m1 + 4 * C * T;
                        const float *m3 = m2 + 4 * C * T;
                        float *r0 = buf + j * TW, *r1 = buf + (4 + j) * TW;
                        #pragma omp simd
                        for (long t = 0; t < TW; ++t) {
                            r0[t] = m0[t] + m1[t] + m2[t];
                            r1[t] = m1[t] - m2[t] - m3[t];
                        }
                    }
                    for (long a = 0; a < 2; ++a) {
                        const long y = 2 * ty + a;
                        if (y >= OH) break;
                        const float *q = buf + 4 * a * TW;
                        float *line = dst + y * OW;
                        for (long t = 0; t < TW; ++t) {
                            const float left = q[t] + q[TW + t] + q[2 * TW + t];
                            const float right = q[TW + t] - q[2 * TW + t] -
                                                q[3 * TW + t];
                            line[2 * t] = left;
                            if (2 * t + 1 < OW) line[2 * t + 1] = right;
                        }
                    }
                }
            }
        }
        free(buf);
    }
    return failed ? -1 : 0;
}
