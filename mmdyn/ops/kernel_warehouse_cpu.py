"""KernelWarehouse's CPU path: the fused cell product (a C loop built on
first use), the packed cells, the mixture layouts and the fast convs.

A KW layer's kernels are ``attention @ cells``: ``[B * m, n] x [n,
cell_size]`` with a few dozen rows, a hundred-odd inner dimension and up to
262144 columns (ResNet-50 at batch 8). MKL runs these shapes at a fraction
of the speed it reaches on large square products, and the assembly is a
large part of a KW ResNet's forward (benchmarks/README.md).

:func:`small_rows_matmul` is a plain register-blocked product for that
shape: the few rows of ``attention`` are packed once into panels of 4, the
columns of ``cells`` are cut into strips of 24 (per call, a block that fits
the L1 cache at a time, or once for good by :func:`pack_columns`), and a
4x24 AVX2/FMA tile sums the inner dimension in registers (a portable C
tile where AVX2/FMA is missing). A :class:`Scatter` writes the result in
another layout than row-major, e.g. each ``[c_o, c_i]`` mixture into its
block of a ``[C_out, C_in]`` kernel, which saves a transposition copy.
Its speed at ResNet-50's shapes is in benchmarks/README.md. Only float32
inference uses it (:func:`uses_small_rows_matmul`); ``torch.matmul`` stays
the reference and the path of autograd, other dtypes and devices.
``MMDYN_KW_CPU_KERNEL=0`` turns it off.

The rest of the module: :class:`PackedCells` (each warehouse cut into
strips once for inference), the mixture layouts (:func:`mix_cells`) and the
fast paths of :class:`~mmdyn.ops.KWConv2d` (:func:`winograd_conv`,
:func:`position_major_conv`, :func:`pointwise_conv`), chosen by
:func:`~mmdyn.ops.fast_paths.kernel_warehouse_path`.
"""
import ctypes
import math
import os
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .c_library import CLibrary, check_float32_cpu, num_threads, ptr
from .fast_paths import graph_capture, uses_c_cell_product
from .per_sample_conv import kernel_workspace
from .winograd import (KERNEL_TRANSFORM_C, chunked_winograd_conv2d,
                       winograd_block_conv2d)

_SOURCE = KERNEL_TRANSFORM_C + r'''
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
'''

#: Columns per packed strip (the width of the C tile).
STRIP = 24


class Scatter(NamedTuple):
    """Where the rows and columns of a product go in ``out`` (flat): row r
    starts at ``row_starts[r]`` and column j lands ``(j // segment) *
    segment_stride + j % segment`` after it. KernelWarehouse uses it to
    write a ``[c_o, c_i]`` cell mixture into its block of a ``[C_out,
    C_in]`` kernel (``segment = c_i``, ``segment_stride = C_in``)."""
    row_starts: torch.Tensor
    segment: int
    segment_stride: int


def _declare(lib: ctypes.CDLL) -> None:
    p, n, i = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.small_rows_matmul_f32.argtypes = [p, p, p, p, n, n, n, p, n, n, i,
                                          i]
    lib.small_rows_matmul_f32.restype = ctypes.c_int
    lib.pack_columns_f32.argtypes = [p, p, n, n, i]
    lib.pack_columns_f32.restype = None


_LIBRARY = CLibrary('kernel_warehouse_cpu', _SOURCE, _declare,
                    'MMDYN_KW_CPU_KERNEL',
                    'KernelWarehouse assembles kernels with torch.matmul')


def load() -> Optional[ctypes.CDLL]:
    """The compiled loop; None when unavailable (no compiler, a failed
    build, or ``MMDYN_KW_CPU_KERNEL=0``)."""
    return _LIBRARY.load()


def uses_small_rows_matmul(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether :func:`small_rows_matmul` serves ``a @ b`` (see
    :func:`~mmdyn.ops.fast_paths.uses_c_cell_product`, whose column
    threshold is in :data:`~mmdyn.ops.fast_paths.THRESHOLDS`)."""
    return uses_c_cell_product(a, b)


def _largest_offset(n: int, segment: int, stride: int) -> int:
    """Largest ``(j // segment) * stride + j % segment`` over j < n: the
    last column, or the last of the segment before it."""
    offset = (n - 1) // segment * stride + (n - 1) % segment
    if n > segment:
        j = (n - 1) // segment * segment - 1
        offset = max(offset, j // segment * stride + j % segment)
    return offset


def pack_columns(b: torch.Tensor) -> torch.Tensor:
    """``b`` [K, N] cut into zero-padded strips of :data:`STRIP` columns,
    ``[ceil(N / STRIP), K, STRIP]``: the layout the C loop reads. Passing it
    as ``packed_b`` saves :func:`small_rows_matmul` cutting ``b`` on every
    call (reading ``b`` with a stride of N costs about 14 % of the product
    at ResNet-50's shapes)."""
    lib = _LIBRARY.require()
    check_float32_cpu('small_rows_matmul', b)
    if b.dim() != 2:
        raise ValueError(f'b must be 2-D, got {tuple(b.shape)}')
    b = b.detach().contiguous()
    k, n = b.shape
    packed = b.new_empty(((n + STRIP - 1) // STRIP, k, STRIP))
    lib.pack_columns_f32(ptr(b), ptr(packed), k, n,
                         num_threads(packed.numel()))
    return packed


def small_rows_matmul(a: torch.Tensor,
                      b: torch.Tensor,
                      out: Optional[torch.Tensor] = None,
                      *,
                      packed_b: Optional[torch.Tensor] = None,
                      scatter: Optional[Scatter] = None,
                      winograd: bool = False) -> torch.Tensor:
    """``a @ b`` for float32 CPU tensors, ``a`` [..., K] with few rows and
    ``b`` [K, N] with many columns (see :func:`uses_small_rows_matmul`).

    Args:
        a (Tensor): [..., K].
        b (Tensor): [K, N]; not read when ``packed_b`` is given.
        out (Tensor, optional): Contiguous output, ``a.shape[:-1] + (N,)``;
            with ``scatter``, any contiguous float32 tensor (required).
        packed_b (Tensor, optional): ``pack_columns(b)``.
        scatter (Scatter, optional): Write the product into ``out`` in this
            layout instead of row-major (bounds are checked).
        winograd (bool): The rows are 3x3 kernels, nine rows (positions)
            per sample, each column one kernel: write their Winograd
            F(2x2, 3x3) transforms ``G w G^T`` instead, ``out`` [rows / 9,
            16, N] (:func:`~mmdyn.ops.winograd.winograd_kernels_reference`
            of the product, without writing the product).

    Returns:
        Tensor: ``out`` (a new tensor when not given).
    """
    lib = _LIBRARY.require()
    check_float32_cpu('small_rows_matmul', a, b)
    if b.dim() != 2 or a.shape[-1] != b.shape[0]:
        raise ValueError(f'cannot multiply {tuple(a.shape)} by '
                         f'{tuple(b.shape)}')
    rows = a.reshape(-1, a.shape[-1]).contiguous()
    (m, k), n = rows.shape, b.shape[1]
    if packed_b is None:
        b = b.contiguous()
    else:
        check_float32_cpu('small_rows_matmul', packed_b)
        if tuple(packed_b.shape) != ((n + STRIP - 1) // STRIP, k, STRIP) \
                or not packed_b.is_contiguous():
            raise ValueError(f'packed_b must be pack_columns(b) of a [{k}, '
                             f'{n}] b, got {tuple(packed_b.shape)}')
    starts, segment, segment_stride = None, n, n
    if winograd:
        shape = (m // 9, 16, n)
        if scatter is not None or m % 9:
            raise ValueError('winograd takes 9 rows per sample and no '
                             'scatter')
        if out is None:
            out = rows.new_empty(shape)
        elif out.numel() != m // 9 * 16 * n or \
                out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f'out must be a contiguous float32 tensor of '
                             f'{m // 9 * 16 * n} elements')
    elif scatter is None:
        shape = (*a.shape[:-1], n)
        if out is None:
            out = rows.new_empty(shape)
        elif tuple(out.shape) != shape or out.dtype != torch.float32 or \
                not out.is_contiguous():
            raise ValueError(
                f'out must be a contiguous float32 {shape} tensor')
    else:
        starts, segment, segment_stride = scatter
        if out is None or out.dtype != torch.float32 or \
                not out.is_contiguous():
            raise ValueError('scatter needs a contiguous float32 out')
        starts = starts.to('cpu', torch.long).contiguous()
        if starts.shape != (m, ) or segment < 1 or segment_stride < 0:
            raise ValueError(f'scatter must give {m} row starts and a '
                             'positive segment')
        if n > segment and segment_stride < segment:
            raise ValueError('scatter segments of a row overlap '
                             f'(segment {segment}, stride {segment_stride})')
        last = _largest_offset(n, segment, segment_stride)
        if m and (int(starts.min()) < 0 or
                  int(starts.max()) + last >= out.numel()):
            raise ValueError('scatter writes outside out')
    check_float32_cpu('small_rows_matmul', out)
    if lib.small_rows_matmul_f32(ptr(rows), ptr(None if packed_b is not None
                                                else b), ptr(packed_b),
                                 ptr(out), m, k, n, ptr(starts), segment,
                                 segment_stride, int(winograd),
                                 num_threads(m * n)):
        raise MemoryError('small_rows_matmul: out of memory for its '
                          'packing buffers')
    return out


# --------------------------------------------------------------------------
# Packed cells: each warehouse cut into column strips once for inference
# --------------------------------------------------------------------------
#: Environment switch: ``0`` turns the packed copies off.
PACKED_CELLS_SWITCH = 'MMDYN_KW_PACKED_CELLS'


class PackedCells:
    """The warehouses of a :class:`~mmdyn.ops.WarehouseManager` cut into
    the column strips of :func:`pack_columns`, built on first use in
    float32 CPU inference and kept until the cells change.

    Every KW layer of a warehouse reads all of its cells; without this copy
    each of them re-cuts the warehouse (read with a stride of a cell row, a
    visible part of KW-1x ResNet-50's assembly time, benchmarks/README.md).
    The copy costs the warehouse's size in memory while it lives: the
    manager drops it on ``train()`` and device or dtype moves. It is
    rebuilt when the cells' storage, shape or version counter changes
    (every in-place update through the parameter: ``load_state_dict`` and
    optimiser steps), or any of 256 evenly spaced values of the cells
    (writes through ``.data``, which leave the version counter alone, e.g.
    mmengine's EMA parameter swap). After a ``.data`` write to only a few
    cells, call :meth:`clear`. ``MMDYN_KW_PACKED_CELLS=0`` turns it off.
    """

    def __init__(self):
        # warehouse index -> ((data_ptr, version, shape), sampled values,
        # packed cells)
        self._cache: Dict[int, Tuple[tuple, torch.Tensor,
                                     torch.Tensor]] = {}
        #: How many times a warehouse was cut into strips (a record for
        #: tests and profiling).
        self.builds = 0

    def get(self, index: int, cells: torch.Tensor,
            training: bool) -> Optional[torch.Tensor]:
        """The strips of warehouse ``index`` (``cells``); None when
        switched off or not in float32 CPU inference."""
        if os.environ.get(PACKED_CELLS_SWITCH, '1') == '0' or training or \
                torch.is_grad_enabled() or graph_capture() or cells.device.type != 'cpu' or \
                cells.dtype != torch.float32:
            return None
        flat = cells.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // 256)].clone()
        key = (cells.data_ptr(), cells._version, tuple(cells.shape))
        cached = self._cache.get(index)
        if cached is None or cached[0] != key or \
                not torch.equal(cached[1], sample):
            cached = (key, sample,
                      pack_columns(cells.reshape(cells.shape[0], -1)))
            self._cache[index] = cached
            self.builds += 1
        return cached[2]

    def clear(self) -> None:
        """Drop every packed copy."""
        self._cache = {}

    def __len__(self) -> int:
        """Warehouses with a packed copy now."""
        return len(self._cache)


# --------------------------------------------------------------------------
# Mixture layouts: the cell product written in the layout a conv reads
# --------------------------------------------------------------------------
#: Layouts of the mixtures ``attention @ cells`` (g_s kernel positions, g_o
#: output and g_i input blocks of c_o x c_i cells): the cell product's own
#: [B, g_s, g_o, g_i, c_o, c_i]; the kernel position by position,
#: [B, g_s, C_out, C_in]; the kernel with each output channel's positions
#: side by side, [B, C_out, g_s, C_in].
MIXTURE_LAYOUTS = ('cells', 'position_major', 'output_major')


def mixture_shape(batch: int, kw_layout: Tuple[int, ...],
                  layout: str) -> Tuple[int, ...]:
    """The shape of ``batch`` samples' mixtures in ``layout``."""
    g_s, g_o, g_i, c_o, c_i = kw_layout
    return {
        'cells': (batch, *kw_layout),
        'position_major': (batch, g_s, g_o * c_o, g_i * c_i),
        'output_major': (batch, g_o * c_o, g_s, g_i * c_i)
    }[layout]


def mixture_scatter(batch: int, kw_layout: Tuple[int, ...],
                    layout: str) -> Scatter:
    """Where mixture (b, s, o, i) starts in the 'position_major' or
    'output_major' layout; its rows of c_i columns are C_in apart, or
    g_s * C_in."""
    g_s, g_o, g_i, c_o, c_i = kw_layout
    sample, position, block_out, block_in = torch.meshgrid(
        *(torch.arange(n, device='cpu') for n in (batch, g_s, g_o, g_i)),
        indexing='ij')
    c_out, c_in = g_o * c_o, g_i * c_i
    if layout == 'position_major':
        starts = ((sample * g_s + position) * c_out +
                  block_out * c_o) * c_in + block_in * c_i
        return Scatter(starts.flatten(), c_i, c_in)
    starts = ((sample * c_out + block_out * c_o) * g_s +
              position) * c_in + block_in * c_i
    return Scatter(starts.flatten(), c_i, g_s * c_in)


def mix_cells(attention: torch.Tensor, cells: torch.Tensor,
              kw_layout: Tuple[int, ...], layout: str, reuse_buffer: bool,
              packed: Callable[[], Optional[torch.Tensor]]
              ) -> Tuple[torch.Tensor, str]:
    """The mixtures ``attention`` [B, m, n] @ ``cells`` [n, c_o * c_i] in
    ``layout`` (see :meth:`~mmdyn.ops.KWConv2d.mix_cells`).

    Float32 CPU inference runs the product as :func:`small_rows_matmul` on
    the packed cells (``packed()``), writing the layout directly; otherwise
    ``torch.matmul``, then a rearranging copy. With ``reuse_buffer`` (in
    inference) the result is written into this thread's reused
    ``'kw_mixtures'`` workspace.

    Returns:
        tuple[Tensor, str]: the mixtures, and the product that made them
        (``'c_loop'`` or ``'matmul'``).
    """
    batch = attention.shape[0]
    g_s, g_o, g_i = kw_layout[:3]
    shape = mixture_shape(batch, kw_layout, layout)
    # Whether the layout is the cell product's own, row after row.
    plain = layout == 'cells' or (g_i == 1 and (
        layout == 'position_major' or g_s == 1))
    c_loop = uses_c_cell_product(attention, cells)
    rows_shape = (*attention.shape[:-1], cells.shape[1])
    out = None
    if reuse_buffer and not torch.is_grad_enabled() and \
            not graph_capture() and (plain or c_loop):
        out = kernel_workspace(math.prod(shape), attention.dtype,
                               attention.device, 'kw_mixtures').view(shape)
    if c_loop:
        if out is None:
            out = attention.new_empty(shape)
        scatter, target = None, out
        if plain:
            target = out.view(rows_shape)
        else:
            scatter = mixture_scatter(batch, kw_layout, layout)
        small_rows_matmul(attention, cells, target, packed_b=packed(),
                          scatter=scatter)
        return out, 'c_loop'
    if plain:
        return torch.matmul(
            attention, cells,
            out=None if out is None else out.view(rows_shape)).view(
                shape), 'matmul'
    mixtures = torch.matmul(attention, cells).view(-1, *kw_layout)
    order = (0, 1, 2, 4, 3, 5) if layout == 'position_major' else \
        (0, 2, 4, 1, 3, 5)
    return mixtures.permute(order).reshape(shape), 'matmul'


# --------------------------------------------------------------------------
# The fast paths of KWConv2d (chosen by fast_paths.kernel_warehouse_path)
# --------------------------------------------------------------------------
def winograd_conv(layer, x: torch.Tensor, attention: torch.Tensor,
                  fused: bool) -> torch.Tensor:
    """Deep 3x3 stride-1 layers in CPU inference: Winograd F(2x2, 3x3), no
    bias.

    ``fused`` (every mixture a whole [C_out, C_in] kernel position and the
    C loop running the cell product): the product writes the transformed
    kernels ``G W_b G^T`` directly, each strip transformed while in the L1
    cache, so the per-sample kernels are never stored. Otherwise they are
    built from the mixtures.
    """
    if fused:
        cells = layer._cell_rows()
        packed = layer.warehouse_manager.packed_cells(layer.warehouse_id)
        return chunked_winograd_conv2d(
            x, layer.out_channels, layer.padding,
            lambda start, stop, out: small_rows_matmul(
                attention[start:stop], cells, out, packed_b=packed,
                winograd=True).view(stop - start, 16, layer.out_channels,
                                    layer.in_channels))
    return winograd_block_conv2d(
        x, layer.mix_cells(attention, reuse_buffer=True), layer.padding)


def position_major_conv(layer, x: torch.Tensor,
                        attention: torch.Tensor) -> torch.Tensor:
    """The conv from the mixtures without the [C_out, C_in, kh, kw] kernel
    layout (with the layer's bias).

    Permuting the mixtures into that layout is a stride-``kh*kw``
    transposition of the largest tensor of the layer (and again in the
    backward). 1x1 layers: one batched matmul with the (strided) input. In
    training the conv is ``sum_p mixtures[:, p] @ columns[:, :, p]``:
    position-major mixtures [B, kh*kw, C_out, C_in] against the im2col
    columns, kernel position by kernel position. In inference the cell
    product writes the mixtures output-major, [B, C_out, kh*kw * C_in], and
    the conv is one batched matmul with position-major columns (inner size
    kh*kw * C_in; less time than nine accumulated ones at ResNet-50's stage
    3-4 shapes, benchmarks/README.md).
    """
    g_s = layer._kw_layout[0]
    h_out, w_out = layer.output_hw(*x.shape[-2:])
    cast = (lambda t: t) if torch.is_autocast_enabled(x.device.type) \
        else (lambda t: t.to(x.dtype))
    if g_s == 1:  # 1x1: strided input, one batched matmul
        if layer.padding != (0, 0):
            x = F.pad(x, (layer.padding[1], ) * 2 + (layer.padding[0], ) * 2)
        if layer.stride != (1, 1):
            x = x[:, :, ::layer.stride[0], ::layer.stride[1]]
        mixtures = layer.mix_cells(attention, True, 'position_major')
        out = torch.bmm(
            cast(mixtures.view(-1, layer.out_channels, layer.in_channels)),
            x.reshape(x.shape[0], layer.in_channels, -1))
    elif not torch.is_grad_enabled():
        kernels = layer.mix_cells(attention, True, 'output_major')
        out = torch.bmm(
            cast(kernels.reshape(x.shape[0], layer.out_channels, -1)),
            position_major_columns(x, layer, h_out, w_out))
    else:
        mixtures = layer.mix_cells(attention, True, 'position_major')
        # unbind, not indexing: its backward is one stack, where nine
        # selects would each scatter into a zero tensor of full size.
        columns = F.unfold(x, layer.kernel_size, layer.dilation,
                           layer.padding, layer.stride).view(
                               x.shape[0], layer.in_channels, g_s,
                               -1).unbind(2)
        parts = cast(mixtures).unbind(1)
        out = torch.bmm(parts[0], columns[0])
        for part, column in zip(parts[1:], columns[1:]):
            out = torch.baddbmm(out, part, column)
    out = out.view(-1, layer.out_channels, h_out, w_out)
    if layer.bias is not None:
        out = out + layer.bias.reshape(1, -1, 1, 1).to(out.dtype)
    return out


def position_major_columns(x: torch.Tensor, conv, h_out: int,
                           w_out: int) -> torch.Tensor:
    """im2col with the kernel positions outermost: [B, kh*kw * C_in,
    H' W'] (``F.unfold`` puts the channels outermost); ``conv`` gives the
    kernel size, padding, stride and dilation."""
    (kh, kw), (ph, pw) = conv.kernel_size, conv.padding
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    x = F.pad(x, (pw, pw, ph, ph))
    views = [
        x[:, :, i * dh:i * dh + sh * (h_out - 1) + 1:sh,
          j * dw:j * dw + sw * (w_out - 1) + 1:sw] for i in range(kh)
        for j in range(kw)
    ]
    return torch.stack(views, 1).view(x.shape[0], -1, h_out * w_out)


def pointwise_conv(layer, x: torch.Tensor,
                   kernel: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv with per-sample kernels [B, C_out, C_in, 1, 1] as one
    batched matmul (with the layer's bias): faster than the grouped conv
    for ResNet-50's 1x1 shapes on CPU, and its graph has no batch size
    baked in (so it also serves export)."""
    if layer.stride != (1, 1):
        x = x[:, :, ::layer.stride[0], ::layer.stride[1]]
    batch, channels, height, width = x.shape
    out = torch.bmm(
        kernel.reshape(batch, layer.out_channels, channels),
        x.reshape(batch, channels, height * width))
    out = out.reshape(batch, layer.out_channels, height, width)
    if layer.bias is not None:
        out = out + layer.bias.reshape(1, -1, 1, 1).to(out.dtype)
    return out
