# Copyright (c) mmdyn contributors. All rights reserved.
"""Export forms: the dynamic layers written for ONNX runtimes.

Under export (:func:`exporting`: ``torch.onnx.export``, ``torch.export``,
TorchScript tracing) the layers take these forms. Each computes the
layer's ``forward_reference`` result from plain PyTorch ops that become
a runtime's fast kernels (``Conv``, ``MatMul``, elementwise products),
with no batch size baked in: ONNX's ``Conv`` has a static ``group``, so the
batch-as-groups conv cannot serve a dynamic batch, and ``F.unfold``
becomes chains of ``Gather``/``Slice`` nodes that runtimes run slowly.

* :func:`im2col`: the im2col columns as ONE grouped ``Conv`` with fixed
  one-hot weights (``groups=C``, weight ``[C*kh*kw, 1, kh, kw]``), the
  column order of ``F.unfold`` (channel-major, then the kernel position).
* :func:`per_sample_conv`: :func:`im2col`, then a batched ``MatMul`` with
  the per-sample kernels (KernelWarehouse, ODConv with several kernels,
  CondConv/DyConv on large maps).
* :func:`odconv`: with one kernel, ``alpha_c`` and ``alpha_s`` scale the
  im2col columns and the static kernel is a 1x1 ``Conv`` over them (the
  layer's FLOPs in one static conv, no per-sample kernel); several
  kernels: :func:`per_sample_conv`.
* :func:`mixture`: CondConv/DyConv; on small maps one static ``Conv`` with
  ``K * C_out`` outputs mixed by the routing weights (``K`` times the conv
  FLOPs, no im2col), otherwise :func:`per_sample_conv`.
* :func:`kernel_warehouse`: the kernels (or mixtures) in the layout the
  conv reads, no transposition of the per-sample kernels.
* :func:`ddf`: DDF as :func:`im2col` of the padded input, the spatial
  filter multiplied in, then the channel filter as a batched ``MatMul``
  over the taps.

The functions receive the layer (or the DDF operator's checked arguments)
as the other paths of :mod:`mmdyn.ops.accel` do.

torch only.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..capture import compiling, graph_capture
from .odconv_paths import folded_weight
from .thresholds import THRESHOLDS

Pair = Tuple[int, int]


def exporting() -> bool:
    """Whether the forward is being exported or traced into a graph that must
    hold for any batch size (ONNX export, ``torch.export``, TorchScript,
    ``torch.fx``), not compiled to run in this process by ``torch.compile``."""
    return graph_capture() and not compiling()


def _one_hot_weight(channels: int, kernel_size: Pair,
                    like: torch.Tensor) -> torch.Tensor:
    """[C*kh*kw, 1, kh, kw]: output ``c*kh*kw + p`` of group ``c`` picks kernel
    position ``p``."""
    kh, kw = kernel_size
    eye = torch.eye(kh * kw, dtype=like.dtype, device=like.device)
    return eye.view(kh * kw, 1, kh, kw).repeat(channels, 1, 1, 1)


def im2col(x: torch.Tensor, kernel_size: Pair, stride: Pair, padding: Pair,
           dilation: Pair) -> torch.Tensor:
    """The im2col columns of ``x`` [B, C, H, W]: [B, C*kh*kw, H', W'] in
    ``F.unfold``'s order (channel, then kernel position), by one grouped
    ``Conv`` with one-hot weights; a 1x1 kernel is the (padded, strided) input
    itself."""
    if tuple(kernel_size) == (1, 1):
        if tuple(padding) != (0, 0):
            x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
        if tuple(stride) != (1, 1):
            x = x[:, :, ::stride[0], ::stride[1]]
        return x
    channels = int(x.shape[1])
    weight = _one_hot_weight(channels, kernel_size, x)
    return F.conv2d(x, weight, None, stride, padding, dilation, channels)


def per_sample_conv(x: torch.Tensor,
                    weight: torch.Tensor,
                    bias: Optional[torch.Tensor],
                    stride: Pair,
                    padding: Pair,
                    dilation: Pair,
                    groups: int = 1) -> torch.Tensor:
    """``conv(x[b], weight[b])`` (``weight`` [B, C_out, C_in/g, kh, kw],
    ``bias`` [B, C_out], [C_out] or None): :func:`im2col`, then one batched
    ``MatMul``."""
    c_out, c_in_g, kh, kw = (int(v) for v in weight.shape[1:])
    cols = im2col(x, (kh, kw), stride, padding, dilation)
    h_out, w_out = int(cols.shape[2]), int(cols.shape[3])
    # -1 for the batch: no batch size baked into the graph.
    if groups == 1:
        out = torch.matmul(
            weight.reshape(-1, c_out, c_in_g * kh * kw),
            cols.reshape(-1, c_in_g * kh * kw, h_out * w_out))
    else:
        out = torch.matmul(
            weight.reshape(-1, groups, c_out // groups, c_in_g * kh * kw),
            cols.reshape(-1, groups, c_in_g * kh * kw, h_out * w_out))
    out = out.reshape(-1, c_out, h_out, w_out)
    if bias is not None:
        b = bias if bias.dim() == 2 else bias.unsqueeze(0)
        out = out + b.reshape(-1, c_out, 1, 1).to(out.dtype)
    return out


# --------------------------------------------------------------------------
# Layer families (signatures of mmdyn.ops.accel.paths.Path.run)
# --------------------------------------------------------------------------
def odconv_folds(layer, x: torch.Tensor) -> bool:
    """ODConv with several kernels: whether the export form folds
    ``alpha_c`` and ``alpha_f`` into the per-sample kernels rather than
    scaling the feature maps: when one sample's kernel has no more elements
    than its input and output maps (early layers), so the scaling touches
    the smaller tensor."""
    h, w = int(x.shape[2]), int(x.shape[3])
    h_out, w_out = layer.output_hw(h, w)
    maps = layer.in_channels * h * w + layer.out_channels * h_out * w_out
    return layer.weight[0].numel() <= maps


def odconv(layer, x, channel, filt, spatial, kernel) -> torch.Tensor:
    """ODConv.

    * One kernel larger than 1x1: the im2col columns of ``x`` scaled by
      ``alpha_c[b, c] * alpha_s[b, p]``, then the static kernel as a 1x1
      ``Conv`` ([C_out, C_in/g * kh*kw]): the layer's FLOPs in one static
      conv, no per-sample kernel. Then ``alpha_f`` and the bias.
    * Several kernels: the per-sample kernels ``(alpha_w @ W) * alpha_s``
      by :func:`per_sample_conv`, with ``alpha_c``/``alpha_f`` folded into
      them on early layers (:func:`odconv_folds`), else scaling ``x`` and
      the output.
    * Kernels that do not depend on the sample (1x1, one kernel): the
      reference, one static conv of ``alpha_c * x``.
    """
    if spatial is None and kernel is None:
        return layer.reference_from_attentions(x, channel, filt, spatial,
                                               kernel)
    if kernel is None:
        positions = layer.attention.num_positions
        cols = im2col(x, layer.kernel_size, layer.stride, layer.padding,
                      layer.dilation)
        h_out, w_out = int(cols.shape[2]), int(cols.shape[3])
        scale = (channel[:, :, None] * spatial[:, None, :]).to(cols.dtype)
        cols = cols * scale.reshape(-1, layer.in_channels * positions, 1, 1)
        weight = layer.weight.reshape(layer.out_channels, -1, 1, 1)
        out = F.conv2d(cols, weight.to(cols.dtype), None, 1, 0, 1,
                       layer.groups)
        return layer.filter_and_bias(
            out.view(-1, layer.out_channels, h_out, w_out), filt)
    if odconv_folds(layer, x):
        weight = folded_weight(layer, channel, filt, spatial, kernel)
        return per_sample_conv(x, weight.to(x.dtype), layer.bias, layer.stride,
                               layer.padding, layer.dilation, layer.groups)
    weight = layer.aggregate_weight(spatial, kernel)
    x = x * channel[:, :, None, None].to(x.dtype)
    out = per_sample_conv(x, weight.to(x.dtype), None, layer.stride,
                          layer.padding, layer.dilation, layer.groups)
    return layer.filter_and_bias(out, filt)


def mixture_stacks_kernels(layer, x: torch.Tensor) -> bool:
    """CondConv/DyConv: whether the export form convolves with all ``K``

    kernels (one static ``Conv``) and mixes the outputs, rather than
    building per-sample kernels: on small maps, ``(K - 1) * H' * W' <=``
    :data:`THRESHOLDS` ``['mixture']['conv_then_mix_max_work']``, where the
    extra conv FLOPs cost less than im2col and a batched ``MatMul``.
    """
    h_out, w_out = layer.output_hw(int(x.shape[2]), int(x.shape[3]))
    return (layer.kernel_num - 1) * h_out * w_out <= \
        THRESHOLDS['mixture']['conv_then_mix_max_work']


def mixture(layer, x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """CondConv/DyConv (routing weights ``pi`` [B, K]): on small maps
    (:func:`mixture_stacks_kernels`) one static ``Conv`` with ``K * C_out``

    outputs, mixed by a batched ``MatMul`` with ``pi``; otherwise the
    per-sample kernels ``pi @ W`` by :func:`per_sample_conv`. Then the
    mixed bias.
    """
    bias = pi @ layer.bias if layer.bias is not None else None
    if not mixture_stacks_kernels(layer, x):
        weight = pi @ layer.weight.flatten(1)
        weight = weight.view(-1, *layer.weight.shape[1:])
        return per_sample_conv(x, weight.to(x.dtype), bias, layer.stride,
                               layer.padding, layer.dilation, layer.groups)
    groups, num = layer.groups, layer.kernel_num
    c_out_g = layer.out_channels // groups
    # Group-major outputs (group, kernel, channel): each group of the
    # stacked conv sees its own input channels.
    bank = layer.weight.reshape(num, groups, c_out_g,
                                *layer.weight.shape[2:]).transpose(0, 1)
    out = F.conv2d(x,
                   bank.reshape(-1, *layer.weight.shape[2:]).to(x.dtype), None,
                   layer.stride, layer.padding, layer.dilation, groups)
    h_out, w_out = int(out.shape[2]), int(out.shape[3])
    out = torch.matmul(
        pi.to(out.dtype).reshape(-1, 1, 1, num),
        out.reshape(-1, groups, num, c_out_g * h_out * w_out))
    out = out.reshape(-1, layer.out_channels, h_out, w_out)
    if bias is not None:
        out = out + bias.reshape(-1, layer.out_channels, 1, 1).to(out.dtype)
    return out


def kw_position_major(layer, x: torch.Tensor) -> bool:
    """KernelWarehouse, whole-position cells: whether the export form convolves
    from the position-major mixtures (deep layers: one sample's kernel larger
    than its im2col columns, which are transposed) rather than building kernels
    in the conv layout."""
    h_out, w_out = layer.output_hw(int(x.shape[2]), int(x.shape[3]))
    columns = layer.in_channels * layer.kernel_size[0] * \
        layer.kernel_size[1] * h_out * w_out
    return math.prod(layer.weight_shape) > columns


def _kw_position_major(layer, x, attention, cells) -> torch.Tensor:
    """``sum_p mixtures[:, p] @ columns[:, p]``, mixtures [B, k*k, C_out, C_in]
    (no kernel layout), with the layer's bias."""
    positions = layer.kernel_size[0] * layer.kernel_size[1]
    cols = im2col(x, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation)
    h_out, w_out = int(cols.shape[2]), int(cols.shape[3])
    cols = cols.reshape(-1, layer.in_channels, positions,
                        h_out * w_out).transpose(1, 2)
    mixtures = torch.matmul(attention,
                            cells).view(-1, positions, layer.out_channels,
                                        layer.in_channels)
    out = torch.matmul(mixtures.to(cols.dtype), cols).sum(1)
    out = out.reshape(-1, layer.out_channels, h_out, w_out)
    if layer.bias is not None:
        out = out + layer.bias.reshape(1, -1, 1, 1).to(out.dtype)
    return out


def kernel_warehouse(layer, x: torch.Tensor,
                     attention: torch.Tensor) -> torch.Tensor:
    """KernelWarehouse (attentions [B, m, n], mixture ``m = (s, o, i)``: kernel
    position, output block, input block): the conv from the mixtures with no
    transposition of the per-sample kernels (a ``Transpose`` of every sample's
    kernel is most of the time otherwise).

    * Whole-position cells (one output and one input block), deep layers
      (:func:`kw_position_major`): the mixtures [B, k*k, C_out, C_in] (one
      GEMM of all the samples' attentions) times the position-major
      im2col columns [B, k*k, C_in, H'W'], summed over the positions.
    * Whole-position cells, early layers: the kernels as ``cells^T @
      attention^T``, [B, C_out * C_in/g, k*k], already in the conv
      layout; then :func:`per_sample_conv`.
    * 1x1 kernels: ``mixtures [B, o, i, c_o, c_i] @ x [B, 1, i, c_i, HW]``
      summed over the input blocks.
    * Other layouts: the reference's kernel assembly, then
      :func:`per_sample_conv`.
    """
    cells = layer._cell_rows()
    g_s, g_o, g_i, c_o, c_i = layer._kw_layout
    attention = attention.to(cells.dtype)
    if g_s == 1 and layer.groups == 1:
        x = im2col(x, (1, 1), layer.stride, layer.padding, (1, 1))
        h_out, w_out = int(x.shape[2]), int(x.shape[3])
        mixtures = torch.matmul(attention, cells).view(-1, g_o, g_i, c_o, c_i)
        out = torch.matmul(
            mixtures.to(x.dtype), x.reshape(-1, 1, g_i, c_i, h_out * w_out))
        out = out.sum(2) if g_i > 1 else out.squeeze(2)
        out = out.reshape(-1, layer.out_channels, h_out, w_out)
        if layer.bias is not None:
            out = out + layer.bias.reshape(1, -1, 1, 1).to(out.dtype)
        return out
    if (g_o, g_i) == (1, 1) and layer.groups == 1 and \
            kw_position_major(layer, x):
        return _kw_position_major(layer, x, attention, cells)
    if (g_o, g_i) == (1, 1):
        kernel = torch.matmul(cells.t(), attention.transpose(1, 2))
        kernel = kernel.view(-1, *layer.weight_shape)
    else:
        kernel = layer.assemble_kernel(attention)
    return per_sample_conv(x, kernel.to(x.dtype), layer.bias, layer.stride,
                           layer.padding, layer.dilation, layer.groups)


def ddf(x: torch.Tensor, cf: torch.Tensor, sf: torch.Tensor, kernel_size: int,
        dilation: int, stride: int, add: bool, out_hw: Pair) -> torch.Tensor:
    """DDF (one head; ``cf`` [B, C, k*k], ``sf`` [B, k*k, Ho, Wo]):

    :func:`im2col` of the input, padded as the reference pads it
    ([B, C, k*k, Ho*Wo]); ``mul``: the columns times the spatial filter,
    then the channel filter as a batched ``MatMul`` ([B, C, 1, k*k] @
    [B, C, k*k, Ho*Wo]); ``add``: the columns times the spatial filter
    summed over the taps, plus the channel filter's ``MatMul``.
    """
    B, C, H, W = (int(v) for v in x.shape)
    Ho, Wo = int(out_hw[0]), int(out_hw[1])
    k, kk = kernel_size, kernel_size * kernel_size
    r = (k - 1) // 2 * dilation
    # Zeros on the far side for the last output row/column (the
    # reference's padding); a larger conv output is cropped.
    bottom = max(0, (Ho - 1) * stride + r - (H - 1))
    right = max(0, (Wo - 1) * stride + r - (W - 1))
    if (bottom, right) != (r, r):
        x = F.pad(x, (r, right, r, bottom))
        padding = (0, 0)
    else:
        padding = (r, r)
    cols = im2col(x, (k, k), (stride, stride), padding, (dilation, dilation))
    if tuple(cols.shape[2:]) != (Ho, Wo):
        cols = cols[:, :, :Ho, :Wo]
    cols = cols.reshape(-1, C, kk, Ho * Wo)
    sf = sf.reshape(-1, 1, kk, Ho * Wo).to(cols.dtype)
    cf = cf.reshape(-1, C, 1, kk).to(cols.dtype)
    if add:
        out = torch.matmul(cf, cols).squeeze(2) + (cols * sf).sum(2)
    else:
        out = torch.matmul(cf, cols * sf).squeeze(2)
    return out.reshape(-1, C, Ho, Wo)


def interleave_phases(phases, scale: int) -> torch.Tensor:
    """DDF-Up's ``scale**2`` phase outputs [B, C, H, W] (phase ``py*s + px``)
    as the [B, C, s*H, s*W] map whose pixel (y*s + py, x*s + px) is phase (py,
    px)'s (y, x): one ``Transpose`` (index assignments export as ``ScatterND``
    chains)."""
    C, H, W = (int(v) for v in phases[0].shape[1:])
    out = torch.stack(phases, 2).reshape(-1, C, scale, scale, H, W)
    return out.permute(0, 1, 4, 2, 5, 3).reshape(-1, C, scale * H, scale * W)
