"""Fused CPU loop for KernelWarehouse's kernel assembly, built on first use.

A KW layer's kernels are ``attention @ cells``: ``[B * m, n] x [n,
cell_size]`` with a few dozen rows, a hundred-odd inner dimension and up to
262144 columns (ResNet-50 at batch 8). MKL runs these shapes at 11-23
GMAC/s on this project's 2-core CPU, about half of what it reaches on large
square products (35 GMAC/s): the assembly alone took 1.04 s of a 2.4 s
KW-1x ResNet-50 forward at batch 8, the static ResNet-50 1.15 s in all.

:func:`small_rows_matmul` is a plain register-blocked product for that
shape: the few rows of ``attention`` are packed once into panels of 4, each
thread packs a block of ``cells`` columns that fits the L1 cache into strips
of 24, and a 4x24 AVX2/FMA tile sums the inner dimension in registers
(a portable C tile where AVX2/FMA is missing). It runs these shapes at
22-32 GMAC/s, 1.0-1.6x MKL, 1.39x over one batch-8 forward
(benchmarks/README.md). Only float32
inference uses it (:func:`uses_small_rows_matmul`); ``torch.matmul``
stays the reference and the path of autograd, other dtypes and devices.
``MMDYN_KW_CPU_KERNEL=0`` turns it off.
"""
import ctypes
from typing import Optional

import torch

from .c_library import CLibrary, num_threads, ptr

_SOURCE = r'''
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#define MR 4
#define NR 24

/* c[0:mr, 0:nr] (row stride ldc) = ap [K][MR] (packed rows) x bp [K][NR]
   (packed columns). */
static void tile_4x24(const float *ap, const float *bp, long K, float *c,
                      long ldc, long mr, long nr) {
    float tile[MR][NR];
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
    _mm256_storeu_ps(tile[0], c00); _mm256_storeu_ps(tile[0] + 8, c01);
    _mm256_storeu_ps(tile[0] + 16, c02);
    _mm256_storeu_ps(tile[1], c10); _mm256_storeu_ps(tile[1] + 8, c11);
    _mm256_storeu_ps(tile[1] + 16, c12);
    _mm256_storeu_ps(tile[2], c20); _mm256_storeu_ps(tile[2] + 8, c21);
    _mm256_storeu_ps(tile[2] + 16, c22);
    _mm256_storeu_ps(tile[3], c30); _mm256_storeu_ps(tile[3] + 8, c31);
    _mm256_storeu_ps(tile[3] + 16, c32);
#else
    memset(tile, 0, sizeof(tile));
    for (long k = 0; k < K; ++k)
        for (int r = 0; r < MR; ++r)
            for (int q = 0; q < NR; ++q)
                tile[r][q] += ap[k * MR + r] * bp[k * NR + q];
#endif
    for (long r = 0; r < mr; ++r) memcpy(c + r * ldc, tile[r], nr * 4);
}

/* C[M, N] = A[M, K] @ B[K, N], all row-major and contiguous. Returns 0,
   or -1 when out of memory (C is then not written). */
int small_rows_matmul_f32(const float *A, const float *B, float *C, long M,
                          long K, long N, int threads) {
    const long panels = (M + MR - 1) / MR;
    float *ap = calloc((size_t)(panels * MR * K), sizeof(float));
    if (!ap) return -1;
    for (long g = 0; g < panels; ++g)
        for (long r = 0; r < MR && g * MR + r < M; ++r)
            for (long k = 0; k < K; ++k)
                ap[(g * K + k) * MR + r] = A[(g * MR + r) * K + k];
    /* Column block of B: about 32 KB packed, a whole number of strips. */
    long block = 32768 / (K * 4) / NR * NR;
    if (block < NR) block = NR;
    const long blocks = (N + block - 1) / block;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        /* 64-byte aligned: unaligned 32-byte loads that straddle cache
           lines cost a third of the speed here. */
        char *raw = malloc((size_t)(block * K) * sizeof(float) + 64);
        float *bp = (float *)(((uintptr_t)raw + 63) & ~(uintptr_t)63);
        if (!raw) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp barrier
        if (!failed) {
            #pragma omp for schedule(static)
            for (long blk = 0; blk < blocks; ++blk) {
                const long n0 = blk * block;
                const long len = (N - n0) < block ? (N - n0) : block;
                const long strips = (len + NR - 1) / NR;
                for (long s = 0; s < strips; ++s) {
                    const long c0 = n0 + s * NR;
                    const long w = (N - c0) < NR ? (N - c0) : NR;
                    float *dst = bp + s * K * NR;
                    if (w == NR) {
                        /* A constant size: two vector moves, no call. */
                        for (long k = 0; k < K; ++k)
                            memcpy(dst + k * NR, B + k * N + c0, NR * 4);
                    } else {
                        for (long k = 0; k < K; ++k)
                            for (long q = 0; q < NR; ++q)
                                dst[k * NR + q] =
                                    q < w ? B[k * N + c0 + q] : 0.0f;
                    }
                }
                for (long g = 0; g < panels; ++g) {
                    const long mr = (M - g * MR) < MR ? (M - g * MR) : MR;
                    for (long s = 0; s < strips; ++s) {
                        const long c0 = n0 + s * NR;
                        const long w = (N - c0) < NR ? (N - c0) : NR;
                        tile_4x24(ap + g * K * MR, bp + s * K * NR, K,
                                  C + g * MR * N + c0, N, mr, w);
                    }
                }
            }
        }
        free(raw);
    }
    free(ap);
    return failed ? -1 : 0;
}
'''

#: Fewest columns (cell elements) for which the loop beats MKL; below,
#: ``torch.matmul``.
MIN_COLUMNS = 4096


def _declare(lib: ctypes.CDLL) -> None:
    p, n = ctypes.c_void_p, ctypes.c_long
    lib.small_rows_matmul_f32.argtypes = [p, p, p, n, n, n, ctypes.c_int]
    lib.small_rows_matmul_f32.restype = ctypes.c_int


_LIBRARY = CLibrary('kernel_warehouse_cpu', _SOURCE, _declare,
                    'MMDYN_KW_CPU_KERNEL',
                    'KernelWarehouse assembles kernels with torch.matmul')


def load() -> Optional[ctypes.CDLL]:
    """The compiled loop; None when unavailable (no compiler, a failed
    build, or ``MMDYN_KW_CPU_KERNEL=0``)."""
    return _LIBRARY.load()


def uses_small_rows_matmul(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether :func:`small_rows_matmul` serves ``a @ b``: float32 CPU
    tensors, no autograd graph, no autocast or tracing, a 2-D ``b`` of at
    least :data:`MIN_COLUMNS` columns, and the loop available."""
    if a.device.type != 'cpu' or b.device.type != 'cpu' or \
            a.dtype != torch.float32 or b.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() or torch.jit.is_tracing() or \
            torch.is_autocast_enabled('cpu'):
        return False
    if b.dim() != 2 or b.shape[1] < MIN_COLUMNS or a.shape[-1] != b.shape[0]:
        return False
    return load() is not None


def small_rows_matmul(a: torch.Tensor,
                      b: torch.Tensor,
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ b`` for float32 CPU tensors, ``a`` [..., K] with few rows and
    ``b`` [K, N] with many columns (see :func:`uses_small_rows_matmul`),
    written into ``out`` (contiguous, ``a.shape[:-1] + (N,)``) when
    given."""
    lib = load()
    if lib is None:
        raise RuntimeError('the KernelWarehouse C loop is unavailable (no C '
                           'compiler, or MMDYN_KW_CPU_KERNEL=0)')
    if a.dtype != torch.float32 or b.dtype != torch.float32 or \
            a.device.type != 'cpu' or b.device.type != 'cpu':
        raise ValueError('small_rows_matmul takes float32 CPU tensors')
    if b.dim() != 2 or a.shape[-1] != b.shape[0]:
        raise ValueError(f'cannot multiply {tuple(a.shape)} by '
                         f'{tuple(b.shape)}')
    rows = a.reshape(-1, a.shape[-1]).contiguous()
    b = b.contiguous()
    shape = (*a.shape[:-1], b.shape[1])
    if out is None:
        out = rows.new_empty(shape)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or \
            not out.is_contiguous():
        raise ValueError(f'out must be a contiguous float32 {shape} tensor')
    if lib.small_rows_matmul_f32(ptr(rows), ptr(b), ptr(out), rows.shape[0],
                                 rows.shape[1], b.shape[1],
                                 num_threads(out.numel())):
        raise MemoryError('small_rows_matmul: out of memory for its '
                          'packing buffers')
    return out
