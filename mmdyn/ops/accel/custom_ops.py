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

Under ``torch.compile`` (not export) DDF's ``'fused'`` path runs as
``mmdyn::ddf``, so compiled graphs keep the C loops for DDF and DDF-Up
(:func:`~mmdyn.ops.accel.paths.ddf_path`). The inference paths of the other
methods (Winograd, KernelWarehouse's C product) reuse workspaces between
calls and stay out of captured graphs; their operators serve direct use.
Every operator needs the C loops (see :mod:`~mmdyn.ops.accel.c_library`) and
raises ``RuntimeError`` naming the environment switch when they are off.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import ddf_cpu, kw_cells, winograd


def _ddf_out_hw(h: int, w: int, kernel_size: int, dilation: int,
                stride: int) -> Tuple[int, int]:
    pad = (kernel_size - 1) // 2 * dilation
    span = dilation * (kernel_size - 1) + 1
    return ((h + 2 * pad - span) // stride + 1,
            (w + 2 * pad - span) // stride + 1)


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


#: Every ``mmdyn::`` operator (for tests and documentation).
OPERATORS = (ddf_op, ddf_backward_op, small_rows_matmul_op, pack_columns_op,
             winograd_kernels_op, winograd_blocks_op, winograd_input_op,
             winograd_output_op)
