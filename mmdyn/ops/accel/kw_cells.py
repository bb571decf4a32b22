# Copyright (c) mmdyn contributors. All rights reserved.
"""KernelWarehouse's CPU path: the fused cell product (a C loop built on first
use), the packed cells, the mixture layouts and the fast convs.

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
inference uses it (:func:`uses_c_cell_product`),
on CPUs where it beats MKL (AVX2; not AVX-512, see
:data:`C_LOOP_MIN_COLUMNS`);
``torch.matmul`` stays the reference and the path of autograd, other
dtypes and devices.
``MMDYN_KW_CPU_KERNEL=0`` turns it off.

The rest of the module: :class:`PackedCells` (each warehouse cut into
strips once for inference) and the mixture layouts (:func:`mix_cells`);
the paths of :class:`~mmdyn.ops.KWConv2d` that use them are in
:mod:`mmdyn.ops.accel.kw_paths`.
"""
import ctypes
import math
from typing import Callable, NamedTuple, Optional, Tuple

import torch

from .. import switches
from ..capture import captured_without_operators, compiling, graph_capture
from ..switches import accel_enabled
from .c_library import (CLibrary, CSourceFile, check_float32_cpu, num_threads,
                        ptr)
from .chunked import kernel_workspace
from .kept_copies import KeptCopies
from .thresholds import THRESHOLDS

#: Columns per packed strip (the width of the C tile).
STRIP = 24

#: The fewest columns (cell elements) from which the C cell product serves
#: a product, per CPU capability (``torch.backends.cpu.
#: get_cpu_capability()``), when ``THRESHOLDS['kernel_warehouse']
#: ['c_loop_min_columns']`` is None. AVX2 (2026-12-01): 1.5-2.5x MKL's
#: ``torch.matmul`` at ResNet-50's shapes. AVX-512 (2026-12-06, Xeon VM,
#: ``benchmarks/kw_assembly.py``): MKL is faster, the C loop 0.84x of it
#: per KW-1x ResNet-50 forward at 1 and 2 threads, so never.
C_LOOP_MIN_COLUMNS = {'AVX512': None}
_AVX2_MIN_COLUMNS = 4096


@torch.compiler.assume_constant_result
def _cpu_capability() -> str:
    """``torch.backends.cpu.get_cpu_capability()``, a constant to TorchDynamo
    (which cannot trace a call returning a string)."""
    return torch.backends.cpu.get_cpu_capability()


def c_loop_min_columns() -> float:
    """The fewest columns from which the C cell product is used (infinite:

    never): ``THRESHOLDS['kernel_warehouse']['c_loop_min_columns']``, or
    when that is None the CPU's default (:data:`C_LOOP_MIN_COLUMNS`,
    4096 for CPUs it does not list).
    """
    value = THRESHOLDS['kernel_warehouse']['c_loop_min_columns']
    if value is not None:
        return value
    value = C_LOOP_MIN_COLUMNS.get(_cpu_capability(), _AVX2_MIN_COLUMNS)
    return math.inf if value is None else value


class Scatter(NamedTuple):
    """Where the rows and columns of a product go in ``out`` (flat): row r
    starts at ``row_starts[r]`` and column j lands ``(j // segment) *
    segment_stride + j % segment`` after it.

    KernelWarehouse uses it to
    write a ``[c_o, c_i]`` cell mixture into its block of a ``[C_out,
    C_in]`` kernel (``segment = c_i``, ``segment_stride = C_in``).
    """
    row_starts: torch.Tensor
    segment: int
    segment_stride: int


def _declare(lib: ctypes.CDLL) -> None:
    p, n, i = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.small_rows_matmul_f32.argtypes = [p, p, p, p, n, n, n, p, n, n, i, i]
    lib.small_rows_matmul_f32.restype = ctypes.c_int
    lib.pack_columns_f32.argtypes = [p, p, n, n, i]
    lib.pack_columns_f32.restype = None


_LIBRARY = CLibrary('kernel_warehouse_cpu', CSourceFile('kernel_warehouse.c'),
                    _declare, switches.KW_CPU_KERNEL,
                    'KernelWarehouse assembles kernels with torch.matmul')


def load() -> Optional[ctypes.CDLL]:
    """The compiled loop; None when unavailable (no compiler, a failed build,
    or ``MMDYN_KW_CPU_KERNEL=0``)."""
    return _LIBRARY.load()


def _largest_offset(n: int, segment: int, stride: int) -> int:
    """Largest ``(j // segment) * stride + j % segment`` over j < n: the last
    column, or the last of the segment before it."""
    offset = (n - 1) // segment * stride + (n - 1) % segment
    if n > segment:
        j = (n - 1) // segment * segment - 1
        offset = max(offset, j // segment * stride + j % segment)
    return offset


def pack_columns(b: torch.Tensor) -> torch.Tensor:
    """``b`` [K, N] cut into zero-padded strips of :data:`STRIP` columns,
    ``[ceil(N / STRIP), K, STRIP]``: the layout the C loop reads.

    Passing it
    as ``packed_b`` saves :func:`small_rows_matmul` cutting ``b`` on every
    call (reading ``b`` with a stride of N costs about 14 % of the product
    at ResNet-50's shapes).
    """
    lib = _LIBRARY.require()
    check_float32_cpu('small_rows_matmul', b)
    if b.dim() != 2:
        raise ValueError(f'b must be 2-D, got {tuple(b.shape)}')
    b = b.detach().contiguous()
    k, n = b.shape
    packed = b.new_empty(((n + STRIP - 1) // STRIP, k, STRIP))
    lib.pack_columns_f32(
        ptr(b), ptr(packed), k, n, num_threads(packed.numel()))
    return packed


def small_rows_matmul(a: torch.Tensor,
                      b: torch.Tensor,
                      out: Optional[torch.Tensor] = None,
                      *,
                      packed_b: Optional[torch.Tensor] = None,
                      scatter: Optional[Scatter] = None,
                      winograd: bool = False) -> torch.Tensor:
    """``a @ b`` for float32 CPU tensors, ``a`` [..., K] with few rows and
    ``b`` [K, N] with many columns (see :func:`uses_c_cell_product`).

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
            16, N] (:func:`~mmdyn.ops.accel.winograd.
            winograd_kernels_reference` of the product, without writing
            the product).

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
        if m and (int(starts.min()) < 0
                  or int(starts.max()) + last >= out.numel()):
            raise ValueError('scatter writes outside out')
    check_float32_cpu('small_rows_matmul', out)
    if lib.small_rows_matmul_f32(
            ptr(rows), ptr(None if packed_b is not None else b), ptr(packed_b),
            ptr(out), m, k, n, ptr(starts), segment, segment_stride,
            int(winograd), num_threads(m * n)):
        raise MemoryError('small_rows_matmul: out of memory for its '
                          'packing buffers')
    return out


# --------------------------------------------------------------------------
# Packed cells: each warehouse cut into column strips once for inference
# --------------------------------------------------------------------------
#: Environment switch: ``0`` turns the packed copies off.
PACKED_CELLS_SWITCH = switches.KW_PACKED_CELLS


class PackedCells:
    """The warehouses of a :class:`~mmdyn.ops.WarehouseManager` cut into the
    column strips of :func:`pack_columns`, built on first use in float32 CPU
    inference and kept until the cells change.

    Every KW layer of a warehouse reads all of its cells; without this copy
    each of them re-cuts the warehouse (read with a stride of a cell row, a
    visible part of KW-1x ResNet-50's assembly time, benchmarks/README.md).
    The copy costs the warehouse's size in memory while it lives: the
    manager drops it on ``train()`` and device or dtype moves. It is
    rebuilt when the cells change, as :mod:`~mmdyn.ops.accel.kept_copies`
    tells (their storage, version counter or 256 sampled values: an EMA
    parameter swap through ``.data`` is seen). After a ``.data`` write to
    only a few cells, call :meth:`clear`. ``MMDYN_KW_PACKED_CELLS=0`` turns
    it off.
    """

    def __init__(self):
        self._copies = KeptCopies()

    @property
    def builds(self) -> int:
        """How many times a warehouse was cut into strips (a record for tests
        and profiling)."""
        return self._copies.builds

    def get(self, index: int, cells: torch.Tensor,
            training: bool) -> Optional[torch.Tensor]:
        """The strips of warehouse ``index`` (``cells``); None when switched
        off or not in float32 CPU inference."""
        if not accel_enabled(PACKED_CELLS_SWITCH) or training or \
                torch.is_grad_enabled() or graph_capture() or \
                cells.device.type != 'cpu' or cells.dtype != torch.float32:
            return None
        return self._copies.get(
            index, cells,
            lambda cells: pack_columns(cells.reshape(cells.shape[0], -1)))

    def clear(self) -> None:
        """Drop every packed copy."""
        self._copies.clear()

    def __len__(self) -> int:
        """Warehouses with a packed copy now."""
        return len(self._copies)


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
    """Where mixture (b, s, o, i) starts in the 'position_major' or.

    'output_major' layout; its rows of c_i columns are C_in apart, or g_s *
    C_in.
    """
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
              packed: Callable[[], Optional[torch.Tensor]],
              c_loop: bool) -> Tuple[torch.Tensor, str]:
    """The mixtures ``attention`` [B, m, n] @ ``cells`` [n, c_o * c_i] in
    ``layout`` (see :meth:`~mmdyn.ops.KWConv2d.mix_cells`).

    With ``c_loop`` (float32 CPU inference, see
    :func:`uses_c_cell_product`) the product runs as
    :func:`small_rows_matmul` on the packed cells (``packed()``), writing
    the layout directly; otherwise
    ``torch.matmul``, then a rearranging copy. With ``reuse_buffer`` (in
    inference) the result is written into this thread's reused
    ``'kw_mixtures'`` workspace.

    Returns:
        tuple[Tensor, str]: the mixtures, and the product that made them
        (``'c_loop'`` or ``'matmul'``).
    """
    if c_loop and compiling():  # one opaque operator of the graph
        return torch.ops.mmdyn.kw_mix_cells(attention, cells, list(kw_layout),
                                            layout), 'c_loop'
    batch = attention.shape[0]
    g_s, g_o, g_i = kw_layout[:3]
    shape = mixture_shape(batch, kw_layout, layout)
    # Whether the layout is the cell product's own, row after row.
    plain = layout == 'cells' or (g_i == 1 and
                                  (layout == 'position_major' or g_s == 1))
    rows_shape = (*attention.shape[:-1], cells.shape[1])
    out = None
    if reuse_buffer and not torch.is_grad_enabled() and \
            not graph_capture() and (plain or c_loop):
        out = kernel_workspace(
            math.prod(shape), attention.dtype, attention.device,
            'kw_mixtures').view(shape)
    if c_loop:
        if out is None:
            out = attention.new_empty(shape)
        scatter, target = None, out
        if plain:
            target = out.view(rows_shape)
        else:
            scatter = mixture_scatter(batch, kw_layout, layout)
        small_rows_matmul(
            attention, cells, target, packed_b=packed(), scatter=scatter)
        return out, 'c_loop'
    if plain:
        return torch.matmul(
            attention,
            cells,
            out=None
            if out is None else out.view(rows_shape)).view(shape), 'matmul'
    mixtures = torch.matmul(attention, cells).view(-1, *kw_layout)
    order = (0, 1, 2, 4, 3, 5) if layout == 'position_major' else \
        (0, 2, 4, 1, 3, 5)
    return mixtures.permute(order).reshape(shape), 'matmul'


def uses_c_cell_product(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether KernelWarehouse's C cell product (:func:`small_rows_matmul`)
    serves ``a @ b``:

    float32 CPU inference (no autograd, autocast or graph capture other
    than ``torch.compile``, where it runs as ``mmdyn::kw_mix_cells``), a
    2-D ``b`` of at least ``c_loop_min_columns`` columns (:data:`THRESHOLDS`
    ``['kernel_warehouse']``; None: the CPU's default,
    :func:`c_loop_min_columns`), the loop
    available.
    """
    if a.device.type != 'cpu' or b.device.type != 'cpu' or \
            a.dtype != torch.float32 or b.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() or captured_without_operators() or \
            torch.is_autocast_enabled('cpu'):
        return False
    if b.dim() != 2 or a.shape[-1] != b.shape[0] or \
            b.shape[1] < c_loop_min_columns():
        return False
    return load() is not None
