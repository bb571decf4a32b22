# Copyright (c) mmdyn contributors. All rights reserved.
"""The C loops of :mod:`mmdyn.ops` as ``torch.library`` custom operators.

Each C entry point is an operator of the ``mmdyn`` namespace with a fake
(meta) implementation, so that ``torch.compile`` and ``torch.export`` see
an opaque op of known output shape instead of ``ctypes`` calls on raw data
pointers (which TorchDynamo cannot trace). The operators are functional:
they return new tensors (no ``out=`` arguments, no reused buffers).

========================== ===============================================
operator                   C loop
========================== ===============================================
``mmdyn::ddf``             DDF's fused forward, stride 1/2, and DDF-Up's
                           phases (``scale > 1``); differentiable through
                           ``mmdyn::ddf_backward``
``mmdyn::ddf_backward``    the fused backward: grads of x, cf, sf
``mmdyn::small_rows_matmul`` KernelWarehouse's cell product ``a @ b``
``mmdyn::pack_columns``    the cells cut into the product's strips
``mmdyn::winograd_kernels`` ``G W_b G^T`` of per-sample 3x3 kernels
``mmdyn::winograd_blocks`` the same from KernelWarehouse's mixtures
``mmdyn::winograd_input``  the input transform ``B^T d B`` of every tile
``mmdyn::winograd_output`` the output transform ``A^T m A``, cropped
========================== ===============================================

The inference paths, whole (each a path of :mod:`~mmdyn.ops.accel.paths`
that a compiled graph calls as one opaque operator), and whole layers:

================================ =========================================
operator                         path
================================ =========================================
``mmdyn::layer_forward``         a whole ODConv, CondConv/DyConv,
                                 KernelWarehouse or DDF conv in compiled
                                 inference (the default,
                                 :data:`WHOLE_LAYER_TYPES`): attentions and
                                 path run in eager mode inside
``mmdyn::winograd_conv``         ``'winograd'`` of ODConv, DyConv and
                                 CondConv: per-sample 3x3 convs of mixed
                                 kernels by Winograd F(2x2, 3x3)
``mmdyn::mixture_chunked_conv``  their ``'chunked'`` path: kernels mixed a
                                 chunk of samples at a time, batch-1 convs
``mmdyn::kw_mix_cells``          KernelWarehouse's C cell product in a
                                 mixture layout (its ``'reference'``,
                                 ``'position_major'`` and ``'pointwise'``
                                 paths build their kernels with it)
``mmdyn::kw_winograd_conv``      KernelWarehouse's ``'winograd'`` and
                                 ``'winograd_fused'``
================================ =========================================

Under ``torch.compile`` (not export: :func:`~mmdyn.ops.capture.compiling`)
the C loops run as these operators, so compiled graphs keep the CPU
inference paths (float32, no autograd) and DDF's ``'fused'`` path
(``mmdyn::ddf``, with its backward;
:func:`~mmdyn.ops.accel.paths.ddf_path`). By default a compiled graph
holds each ODConv, CondConv/DyConv, KernelWarehouse and DDF conv as one
``mmdyn::layer_forward`` node (:func:`layer_forward_operator`): most of
the first compile of a dynamic ResNet-50 is Inductor generating and
compiling C++ for the small kernels of the attention branches, which
this leaves out, and the layer then runs as fast as in eager mode; the
path operators serve layers outside :data:`WHOLE_LAYER_TYPES` (or with it
emptied, to let Inductor fuse the attentions). Inside an operator the loops may
use their reused workspaces as in eager mode: only the returned tensor
leaves it, and it is always new. The whole-path operators read no module:
every tensor they use is an argument, so the graph sees the parameters it
depends on (``mmdyn::layer_forward`` reads its layer's parameters itself:
inference only). Under export, TorchScript, ONNX and ``torch.fx`` none of them
is used (export forms, :mod:`~mmdyn.ops.accel.export_forms`).
Every operator needs the C loops (see :mod:`~mmdyn.ops.accel.c_library`) and
raises ``RuntimeError`` naming the environment switch when they are off.
"""
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..capture import compiling
from ..switches import accel_disabled
from . import ddf_cpu, kw_cells, winograd
from .chunked import chunked_per_sample_conv2d, mix_kernels_into


def _ddf_lib():
    lib = ddf_cpu.load()
    if lib is None:
        raise RuntimeError('mmdyn::ddf needs the DDF C loops (no C compiler,'
                           ' a failed build, or MMDYN_DDF_CPU_KERNEL=0)')
    return lib


@torch.library.custom_op('mmdyn::ddf', mutates_args=())
def ddf_op(x: Tensor, channel_filter: Tensor, spatial_filter: Tensor,
           kernel_size: int, dilation: int, stride: int, add: bool,
           scale: int) -> Tensor:
    """DDF by the fused C loop: ``x`` [B, C, H, W], ``channel_filter``
    [B, C, k*k], ``spatial_filter`` [B, k*k, H', W'] (float32 or float64,
    CPU); with ``scale`` > 1 (stride 1) DDF-Up: the filters are
    [s*s, B, C, k*k] and [s*s, B, k*k, H, W] and the output [B, C, s*H,
    s*W]."""
    out_hw = tuple(spatial_filter.shape[-2:])
    return ddf_cpu.forward(_ddf_lib(), x.contiguous(),
                           channel_filter.contiguous(),
                           spatial_filter.contiguous(), out_hw, kernel_size,
                           dilation, stride, add, scale)


@ddf_op.register_fake
def _(x, channel_filter, spatial_filter, kernel_size, dilation, stride, add,
      scale):
    b, c, h, w = x.shape
    if scale > 1:
        return x.new_empty((b, c, h * scale, w * scale))
    return x.new_empty((b, c, *spatial_filter.shape[-2:]))


@torch.library.custom_op('mmdyn::ddf_backward', mutates_args=())
def ddf_backward_op(grad_out: Tensor, x: Tensor, channel_filter: Tensor,
                    spatial_filter: Tensor, kernel_size: int, dilation: int,
                    stride: int, add: bool,
                    scale: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`ddf_op` with respect to x and both filters."""
    lib = _ddf_lib()
    grad_out, x = grad_out.contiguous(), x.contiguous()
    cf, sf = channel_filter.contiguous(), spatial_filter.contiguous()
    needs = (True, True, True)
    if scale == 1:
        return ddf_cpu.backward(lib, grad_out, x, cf, sf, kernel_size,
                                dilation, stride, add, needs)
    b, c, h, w = x.shape
    grad6 = grad_out.reshape(b, c, h, scale, w, scale)
    gx = torch.zeros_like(x)
    gcf, gsf = torch.empty_like(cf), torch.empty_like(sf)
    for p in range(scale * scale):
        go = grad6[:, :, :, p // scale, :, p % scale].contiguous()
        gx_p, gcf[p], gsf[p] = ddf_cpu.backward(lib, go, x, cf[p], sf[p],
                                                kernel_size, dilation, 1, add,
                                                needs)
        gx += gx_p
    return gx, gcf, gsf


@ddf_backward_op.register_fake
def _(grad_out, x, channel_filter, spatial_filter, kernel_size, dilation,
      stride, add, scale):
    return (torch.empty_like(x), torch.empty_like(channel_filter),
            torch.empty_like(spatial_filter))


def _ddf_setup_context(ctx, inputs, output):
    x, cf, sf, kernel_size, dilation, stride, add, scale = inputs
    ctx.save_for_backward(x, cf, sf)
    ctx.conf = (kernel_size, dilation, stride, add, scale)


def _ddf_backward(ctx, grad_out):
    x, cf, sf = ctx.saved_tensors
    gx, gcf, gsf = ddf_backward_op(grad_out, x, cf, sf, *ctx.conf)
    return gx, gcf, gsf, None, None, None, None, None


ddf_op.register_autograd(_ddf_backward, setup_context=_ddf_setup_context)


@torch.library.custom_op('mmdyn::small_rows_matmul', mutates_args=())
def small_rows_matmul_op(a: Tensor, b: Tensor) -> Tensor:
    """``a`` [..., K] @ ``b`` [K, N] by KernelWarehouse's C cell product
    (float32 CPU, inference)."""
    return kw_cells.small_rows_matmul(a, b)


@small_rows_matmul_op.register_fake
def _(a, b):
    return a.new_empty((*a.shape[:-1], b.shape[1]))


@torch.library.custom_op('mmdyn::pack_columns', mutates_args=())
def pack_columns_op(b: Tensor) -> Tensor:
    """``b`` [K, N] cut into the zero-padded strips the cell product reads,
    [ceil(N / 24), K, 24]."""
    return kw_cells.pack_columns(b)


@pack_columns_op.register_fake
def _(b):
    strip = kw_cells.STRIP
    return b.new_empty(((b.shape[1] + strip - 1) // strip, b.shape[0], strip))


@torch.library.custom_op('mmdyn::winograd_kernels', mutates_args=())
def winograd_kernels_op(bank: Tensor, mix: Optional[Tensor],
                        spatial: Optional[Tensor]) -> Tensor:
    """``G W_b G^T`` with ``W_b = spatial[b] * sum_k mix[b, k] bank[k]``:

    [B, 16, C_out, C_in] (see
    :func:`~mmdyn.ops.accel.winograd.winograd_kernels_reference`).
    """
    return winograd.winograd_kernels(bank, mix, spatial)


@winograd_kernels_op.register_fake
def _(bank, mix, spatial):
    batch = (mix if mix is not None else spatial).shape[0]
    return bank.new_empty((batch, 16, bank.shape[1], bank.shape[2]))


@torch.library.custom_op('mmdyn::winograd_blocks', mutates_args=())
def winograd_blocks_op(mixtures: Tensor) -> Tensor:
    """The Winograd kernels of mixtures [B, 9, g_o, g_i, c_o, c_i]:

    [B, 16, g_o * c_o, g_i * c_i].
    """
    return winograd.winograd_kernels_from_blocks(mixtures.contiguous())


@winograd_blocks_op.register_fake
def _(mixtures):
    b, _, g_o, g_i, c_o, c_i = mixtures.shape
    return mixtures.new_empty((b, 16, g_o * c_o, g_i * c_i))


@torch.library.custom_op('mmdyn::winograd_input', mutates_args=())
def winograd_input_op(x: Tensor, padding: List[int]) -> Tensor:
    """The transformed 4x4 input tiles of ``x`` [B, C, H, W]: [B, 16, C,
    tiles]."""
    return winograd._input_transform(x, tuple(padding))[0]


@winograd_input_op.register_fake
def _(x, padding):
    b, c, h, w = x.shape
    tiles = ((h + 2 * padding[0] - 1) // 2) * ((w + 2 * padding[1] - 1) // 2)
    return x.new_empty((b, 16, c, tiles))


@torch.library.custom_op('mmdyn::winograd_output', mutates_args=())
def winograd_output_op(m: Tensor, grid: List[int],
                       out_hw: List[int]) -> Tensor:
    """The output tiles ``A^T m A`` of ``m`` [B, 16, C, tiles] on a ``grid`` of
    tiles, cropped to ``out_hw``: [B, C, *out_hw]."""
    return winograd._output_transform(m, tuple(grid), tuple(out_hw))


@winograd_output_op.register_fake
def _(m, grid, out_hw):
    return m.new_empty((m.shape[0], m.shape[2], *out_hw))


# --------------------------------------------------------------------------
# Whole inference paths (compiled graphs)
# --------------------------------------------------------------------------
def _conv_out(x: Tensor, c_out: int, kernel_hw: Sequence[int],
              stride: Sequence[int], padding: Sequence[int],
              dilation: Sequence[int]) -> Tensor:
    """A new [B, c_out, H', W'] tensor: the output of a conv of ``x``."""
    h, w = x.shape[-2:]
    out_h = (h + 2 * padding[0] - dilation[0] *
             (kernel_hw[0] - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] *
             (kernel_hw[1] - 1) - 1) // stride[1] + 1
    return x.new_empty((x.shape[0], c_out, out_h, out_w))


@torch.library.custom_op('mmdyn::winograd_conv', mutates_args=())
def winograd_conv_op(x: Tensor, bank: Tensor, mix: Optional[Tensor],
                     spatial: Optional[Tensor], padding: List[int]) -> Tensor:
    """``conv(x[b], spatial[b] * sum_k mix[b, k] bank[k])``, 3x3 stride 1, no
    bias, by Winograd F(2x2, 3x3) (see
    :func:`~mmdyn.ops.accel.winograd.winograd_per_sample_conv2d`): ``x`` [B,
    C_in, H, W], ``bank`` [K, C_out, C_in, 3, 3], ``mix`` [B, K] (None: one
    kernel), ``spatial`` [B, 9] (None: none)."""
    return winograd.winograd_per_sample_conv2d(x, bank, mix, spatial,
                                               tuple(padding))


@winograd_conv_op.register_fake
def _(x, bank, mix, spatial, padding):
    return _conv_out(x, bank.shape[1], (3, 3), (1, 1), padding, (1, 1))


@torch.library.custom_op('mmdyn::mixture_chunked_conv', mutates_args=())
def mixture_chunked_conv_op(x: Tensor, bank: Tensor, mix: Optional[Tensor],
                            spatial: Optional[Tensor], stride: List[int],
                            padding: List[int], dilation: List[int],
                            groups: int) -> Tensor:
    """``conv(x[b], W_b)``, ``W_b = (mix[b] @ bank) * spatial[b]``, no bias.

    The kernels of ODConv, DyConv and CondConv: ``bank`` [K, C_out,
    C_in/g, kh, kw], ``mix`` [B, K] or None for one kernel, ``spatial``
    [B, kh*kw] or None. They are built a chunk of samples at a time into
    the reused workspace, then convolved by batch-1 convs (see
    :func:`~mmdyn.ops.accel.chunked.chunked_per_sample_conv2d`).
    """
    flat = bank.flatten(1)
    mix = None if mix is None else mix.to(bank.dtype)
    spatial = None if spatial is None else spatial.to(bank.dtype)

    def kernels(start, stop, out):
        if spatial is None:
            return torch.matmul(mix[start:stop], flat, out=out)
        return mix_kernels_into(None if mix is None else mix[start:stop], flat,
                                spatial[start:stop], out)

    with torch.autocast(x.device.type, enabled=False):
        return chunked_per_sample_conv2d(x, kernels,
                                         bank.shape[1:], bank.dtype,
                                         tuple(stride), tuple(padding),
                                         tuple(dilation), groups)


@mixture_chunked_conv_op.register_fake
def _(x, bank, mix, spatial, stride, padding, dilation, groups):
    return _conv_out(x, bank.shape[1], bank.shape[-2:], stride, padding,
                     dilation)


#: The warehouses cut into strips for the operators below, keyed by the
#: cells' address (see :func:`packed_cells`).
_PACKED = kw_cells.PackedCells()
#: At most this many packed warehouses are kept (then all are dropped).
MAX_PACKED_WAREHOUSES = 32


def packed_cells(cells: Tensor) -> Optional[Tensor]:
    """``cells`` [n, cell_size] cut into the strips of the C cell product, kept
    while their storage, version and sampled values stay the same (as
    :meth:`~mmdyn.ops.WarehouseManager.packed_cells` keeps them for eager
    inference); None when the packed copies are switched off."""
    if len(_PACKED) >= MAX_PACKED_WAREHOUSES:
        _PACKED.clear()
    with torch.no_grad():
        return _PACKED.get(cells.data_ptr(), cells, False)


def release_packed_cells() -> None:
    """Free the packed warehouses kept by :func:`packed_cells`."""
    _PACKED.clear()


def _kw_layout(kw_layout: Sequence[int]) -> Tuple[int, ...]:
    if len(kw_layout) != 5:
        raise ValueError('kw_layout must be (g_s, g_o, g_i, c_o, c_i), got '
                         f'{tuple(kw_layout)}')
    return tuple(int(n) for n in kw_layout)


@torch.library.custom_op('mmdyn::kw_mix_cells', mutates_args=())
def kw_mix_cells_op(attention: Tensor, cells: Tensor, kw_layout: List[int],
                    layout: str) -> Tensor:
    """KernelWarehouse's mixtures ``attention`` [B, m, n] @ ``cells`` [n, c_o *
    c_i] by the C cell product, written in ``layout`` (see
    :func:`~mmdyn.ops.accel.kw_cells.mix_cells`; ``kw_layout`` = (g_s, g_o,
    g_i, c_o, c_i))."""
    packed = packed_cells(cells)
    mixtures, _ = kw_cells.mix_cells(attention, cells, _kw_layout(kw_layout),
                                     layout, False, lambda: packed, True)
    return mixtures


@kw_mix_cells_op.register_fake
def _(attention, cells, kw_layout, layout):
    return attention.new_empty(
        kw_cells.mixture_shape(attention.shape[0], _kw_layout(kw_layout),
                               layout))


@torch.library.custom_op('mmdyn::kw_winograd_conv', mutates_args=())
def kw_winograd_conv_op(x: Tensor, attention: Tensor, cells: Tensor,
                        kw_layout: List[int], padding: List[int],
                        fused: bool) -> Tensor:
    """KernelWarehouse's 3x3 stride-1 conv of ``x`` with the kernels
    ``attention`` @ ``cells`` by Winograd F(2x2, 3x3), no bias.

    ``fused`` (whole-position cells): the C cell product writes the
    transformed kernels; otherwise they are made from the mixtures, which
    the C cell product makes where it serves eager inference (see
    :func:`~mmdyn.ops.accel.kw_paths.winograd_conv`).
    """
    kw_layout = _kw_layout(kw_layout)
    _, g_o, g_i, c_o, c_i = kw_layout
    c_out, c_in = g_o * c_o, g_i * c_i
    packed = packed_cells(cells)
    if fused:
        if (g_o, g_i) != (1, 1):
            raise ValueError('fused needs whole-position cells, got '
                             f'kw_layout {kw_layout}')
        return winograd.chunked_winograd_conv2d(
            x, c_out, tuple(padding),
            lambda start, stop, out: kw_cells.small_rows_matmul(
                attention[start:stop],
                cells,
                out,
                packed_b=packed,
                winograd=True).view(stop - start, 16, c_out, c_in))
    with torch.no_grad():  # as in eager inference: MKL or the C loop
        c_loop = kw_cells.uses_c_cell_product(attention, cells)
    mixtures, _ = kw_cells.mix_cells(attention, cells, kw_layout, 'cells',
                                     True, lambda: packed, c_loop)
    return winograd.winograd_block_conv2d(x, mixtures, tuple(padding))


@kw_winograd_conv_op.register_fake
def _(x, attention, cells, kw_layout, padding, fused):
    return _conv_out(x, kw_layout[1] * kw_layout[3], (3, 3), (1, 1), padding,
                     (1, 1))


# --------------------------------------------------------------------------
# Whole layers (compiled inference)
# --------------------------------------------------------------------------
#: The layer classes whose whole forward a compiled graph runs as one
#: ``mmdyn::layer_forward`` in CPU float32 inference (see
#: :func:`layer_forward_operator`); empty: their attentions and filter
#: branches enter the graph and only their C-loop paths are operators
#: (first compiles and speeds of both: benchmarks/compile.md,
#: ``benchmarks/compile.py --path-operators``).
WHOLE_LAYER_TYPES = ('ODConv2d', 'CondConv2d', 'DyConv2d', 'KWConv2d',
                     'DDFConv2d')

#: id -> weak reference of the layers compiled graphs call.
_LAYERS: Dict[int, 'weakref.ref'] = {}


@torch.compiler.assume_constant_result
def _layer_key(layer) -> int:
    """The layer's key in the operator's registry (a constant of the graph;
    registered while TorchDynamo traces)."""
    key = id(layer)
    _LAYERS[key] = weakref.ref(layer)
    if len(_LAYERS) > 1024:  # drop the freed layers
        for dead in [k for k, ref in _LAYERS.items() if ref() is None]:
            del _LAYERS[dead]
    return key


@torch.library.custom_op('mmdyn::layer_forward', mutates_args=())
def layer_forward_op(x: Tensor, layer: int, out_shape: List[int]) -> Tensor:
    """The eager forward of the registered ``layer`` (its attentions and the
    path :func:`~mmdyn.ops.accel.paths.choose_path` takes, C loops and
    workspaces included) on ``x``, without autograd and without the layer's
    hooks (the traced graph calls them around the operator); the output is
    ``out_shape``."""
    module = _LAYERS[layer]()
    if module is None:
        raise RuntimeError('mmdyn::layer_forward: the layer of this compiled '
                           'graph was freed')
    with torch.no_grad():
        # forward, not __call__: the compiled graph has run the layer's
        # hooks around this operator already.
        return module.forward(x)


@layer_forward_op.register_fake
def _(x, layer, out_shape):
    return x.new_empty(out_shape)


def layer_forward_operator(layer, x: Tensor) -> Optional[Tensor]:
    """Under ``torch.compile`` (not export), for a layer of
    :data:`WHOLE_LAYER_TYPES` in eval mode on a float32 CPU input without
    autograd or autocast (and without ``MMDYN_DISABLE_ACCEL``): the layer's
    output as one ``mmdyn::layer_forward`` node (its forward runs in eager
    mode inside: the graph holds no attention branch, so Inductor has less
    code to generate and compile). None otherwise (the caller runs its
    forward)."""
    if not compiling() or accel_disabled() or layer.training or \
            torch.is_grad_enabled() or x.device.type != 'cpu' or \
            x.dtype != torch.float32 or \
            torch.is_autocast_enabled('cpu') or not any(
                cls.__name__ in WHOLE_LAYER_TYPES
                for cls in type(layer).__mro__):
        return None
    h_out, w_out = layer.output_hw(x.shape[2], x.shape[3])
    return layer_forward_op(x, _layer_key(layer),
                            [x.shape[0], layer.out_channels, h_out, w_out])


#: Every ``mmdyn::`` operator (for tests and documentation).
OPERATORS = (ddf_op, ddf_backward_op, small_rows_matmul_op, pack_columns_op,
             winograd_kernels_op, winograd_blocks_op, winograd_input_op,
             winograd_output_op, winograd_conv_op, mixture_chunked_conv_op,
             kw_mix_cells_op, kw_winograd_conv_op, layer_forward_op)
