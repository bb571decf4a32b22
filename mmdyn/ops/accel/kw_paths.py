# Copyright (c) mmdyn contributors. All rights reserved.
"""The accelerated paths of :class:`~mmdyn.ops.KWConv2d`: each computes the
layer's ``forward_reference`` result another way (chosen by
:mod:`mmdyn.ops.accel.paths`). Each function receives the layer and the
attentions ``[B, m, n]`` of its input; the mixtures come from the layer's
``mix_cells`` (:func:`~mmdyn.ops.accel.kw_cells.mix_cells`: the C cell product
in float32 CPU inference, reused buffers).

torch only.
"""

import torch
import torch.nn.functional as F

from ..capture import compiling, graph_capture
from ..per_sample_conv import pointwise_per_sample_conv
from . import tap_sum_cpu
from .chunked import chunked_per_sample_conv2d
from .custom_ops import kw_winograd_conv_op
from .kw_cells import small_rows_matmul
from .kw_train import cells_layout_conv, position_major_columns
from .winograd import chunked_winograd_conv2d, winograd_block_conv2d


def assembled_kernel(layer, attention: torch.Tensor) -> torch.Tensor:
    """The per-sample kernels [B, *weight_shape] from the layer's ``mix_cells``
    (the accelerated product; the reference is the layer's
    ``assemble_kernel``)."""
    if layer._kw_layout[0] == 1:  # one position: no transposition
        kernel = layer.mix_cells(attention, layout='position_major')
    else:
        kernel = layer.mix_cells(attention).permute(0, 2, 4, 3, 5, 1)
    return kernel.reshape(-1, *layer.weight_shape)


def kernel_like(layer, attention: torch.Tensor,
                x: torch.Tensor) -> torch.Tensor:
    """:func:`assembled_kernel` in the dtype of ``x`` (autocast aside)."""
    kernel = assembled_kernel(layer, attention)
    if not torch.is_autocast_enabled(x.device.type):
        kernel = kernel.to(x.dtype)
    return kernel


def _add_bias(layer, out: torch.Tensor) -> torch.Tensor:
    if layer.bias is not None:
        out += layer.bias.reshape(1, -1, 1, 1).to(out.dtype)
    return out


def reference(layer, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """The reference forward with the kernels of :func:`assembled_kernel` (the
    same formulas, the mixture product accelerated)."""
    return layer.reference_from_attention(x, attention,
                                          kernel_like(layer, attention, x))


def chunked(layer, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Kernels a chunk of samples at a time, then batch-1 convs (inference).

    Under ``torch.compile``: the reference conv of the kernels from the C
    cell product (``mmdyn::kw_mix_cells``); the workspace stays out of the
    graph.
    """
    if compiling():
        return reference(layer, x, attention)
    out = chunked_per_sample_conv2d(
        x, lambda start, stop, _: assembled_kernel(layer, attention[
            start:stop]).flatten(1).to(x.dtype), layer.weight_shape, None,
        layer.stride, layer.padding, layer.dilation, layer.groups)
    return _add_bias(layer, out)


def winograd(layer, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Winograd F(2x2, 3x3) from the mixtures (inference)."""
    return _add_bias(layer, winograd_conv(layer, x, attention, False))


def winograd_fused(layer, x: torch.Tensor,
                   attention: torch.Tensor) -> torch.Tensor:
    """Winograd F(2x2, 3x3), the C cell product writing the transformed kernels
    (inference)."""
    return _add_bias(layer, winograd_conv(layer, x, attention, True))


def pointwise(layer, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """1x1 without padding: one batched matmul."""
    kernel = kernel_like(layer, attention, x)
    return pointwise_per_sample_conv(
        x, kernel.reshape(x.shape[0], layer.out_channels, layer.in_channels),
        layer.bias, layer.stride)


def position_major(layer, x: torch.Tensor,
                   attention: torch.Tensor) -> torch.Tensor:
    """The conv straight from the mixtures (see
    :func:`position_major_conv`)."""
    return position_major_conv(layer, x, attention)


def taps(layer, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Stride-1 layers larger than 1x1 in CPU inference: the mixtures written
    position-major, ``[B, kh*kw, C_out, C_in]``, are the tap-major kernels of
    :func:`~mmdyn.ops.accel.tap_sum_cpu.stride1_tap_conv` (one batched GEMM
    to every tap's output channels, then the C tap sum)."""
    return tap_sum_cpu.stride1_tap_conv(
        tap_sum_cpu.load(), x,
        layer.mix_cells(attention, True, 'position_major'), layer.kernel_size,
        layer.dilation, layer.padding, layer.bias)


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
    if compiling():  # the C loops as one opaque operator of the graph
        return kw_winograd_conv_op(x, attention, layer._cell_rows(),
                                   list(layer._kw_layout), list(layer.padding),
                                   fused)
    if fused:
        cells = layer._cell_rows()
        packed = layer.warehouse_manager.packed_cells(layer.warehouse_id)
        return chunked_winograd_conv2d(
            x, layer.out_channels, layer.padding,
            lambda start, stop, out: small_rows_matmul(
                attention[start:stop],
                cells,
                out,
                packed_b=packed,
                winograd=True).view(stop - start, 16, layer.out_channels, layer
                                    .in_channels))
    return winograd_block_conv2d(x,
                                 layer.mix_cells(attention, reuse_buffer=True),
                                 layer.padding)


def cells_layout_pays(layer, x: torch.Tensor, attention: torch.Tensor) -> bool:
    """Whether the position-major path's inference convolves from the mixtures
    in the cells' own layout (:func:`~mmdyn.ops.accel.kw_train.

    cells_layout_conv`: the product written as it comes, one ``bmm`` per
    cell position): 1x1 layers whose cells span part of the input
    channels (where the kernel layout is not the product's own) and whose
    mixtures come from ``torch.matmul``, which cannot write another layout
    without a copy of them (on AVX-512, where it serves the product; the
    C product's ``Scatter`` writes any layout). Measured on AVX-512,
    2026-12-06, batch 8, 1 thread, 2048 -> 512 at 7x7 with 512 x 512
    cells: the mixtures rearranged then one ``bmm`` 50 ms, from the cells'
    layout 22 ms. A 3x3 512 -> 512 layer keeps the output-major mixtures
    and one ``bmm`` (52 ms against 59 ms for nine). Not under graph
    capture or autocast.
    """
    g_s, _, g_i = layer._kw_layout[:3]
    return g_s == 1 and g_i > 1 and not torch.is_grad_enabled() and \
        not graph_capture() and \
        not torch.is_autocast_enabled(x.device.type) and \
        x.dtype == layer._cells().dtype and \
        not layer.uses_c_cell_product(attention)


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
    if cells_layout_pays(layer, x, attention):
        return cells_layout_conv(layer, x, attention)
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
        columns = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding,
                           layer.stride).view(x.shape[0], layer.in_channels,
                                              g_s, -1).unbind(2)
        parts = cast(mixtures).unbind(1)
        out = torch.bmm(parts[0], columns[0])
        for part, column in zip(parts[1:], columns[1:]):
            out = torch.baddbmm(out, part, column)
    out = out.view(-1, layer.out_channels, h_out, w_out)
    if layer.bias is not None:
        out = out + layer.bias.reshape(1, -1, 1, 1).to(out.dtype)
    return out
