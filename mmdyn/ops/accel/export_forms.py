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
* :func:`odconv`: with one kernel, the attention branch folded
  (:func:`odconv_attentions`: the norm and the temperature in the weights,
  one ``Conv`` and ``Sigmoid`` for every head, [B, C, 1, 1] scales with no
  reshape), ``alpha_c * x``, its im2col columns times ``alpha_s`` and the
  static kernel as a 1x1 ``Conv`` over them (the layer's FLOPs in one
  static conv, no per-sample kernel), or one of the other exact forms
  :data:`ODCONV_ONE_KERNEL_FORM` names; several kernels:
  :func:`per_sample_conv`.
* :func:`mixture`: CondConv/DyConv; on small maps one static ``Conv`` with
  ``K * C_out`` outputs mixed by the routing weights (``K`` times the conv
  FLOPs, no im2col), otherwise :func:`per_sample_conv`.
* :func:`kernel_warehouse`: the kernels (or mixtures) in the layout the
  conv reads, no transposition of the per-sample kernels; the attention
  folded (:func:`kw_attention`).
* DDF and DDF-Up: :mod:`mmdyn.ops.accel.ddf_export_forms` (the filter
  norms' centring folded into the branches' convs, :func:`im2col`, the
  spatial filter multiplied in, the channel filter as a batched
  ``MatMul`` over the taps).

The functions receive the layer (or the DDF operator's checked arguments)
as the other paths of :mod:`mmdyn.ops.accel` do. Where a form folds an
attention branch it computes the attentions again from the input; the
layer's own attention nodes are then unused and the exporter drops them.
Shapes in the graph are constants with a -1 batch (only the batch is
dynamic), so no ``Shape``/``Gather``/``Concat`` chains.

**Nodes per layer** (simplified export; a static conv is 1 node, its BN
folded in; the BN after a dynamic layer no longer folds, +1 each, its
scale foldable but its shift then an ``Add``):

* ODConv, one kernel: the attention branch is 6 (``ReduceMean``, hidden
  ``Conv``, ``Relu``, heads ``Conv``, ``Sigmoid``, ``Split``: a pooling,
  two linear maps around a non-linearity, a sigmoid, and the split into
  scales of different sizes). A 1x1 layer adds 3 (``x * alpha_c``, the
  static ``Conv``, ``* alpha_f``: per-sample scales on both sides of the
  conv, which neither folds into the static weights): 9, the least with
  standard ONNX ops. A 3x3 layer also needs ``alpha_s`` per tap: the taps
  apart (im2col ``Conv``), scaled (``Mul``) and summed (``Conv``): 11 by
  the scaled columns; the per-sample kernels (:func:`odconv_sample_kernels`,
  faster on early layers) 14.
* KernelWarehouse: the attention 7 (``ReduceMean``, ``Gemm``, ``Relu``,
  ``Gemm``, ``Abs``, ``ReduceSum``, ``Div``; the ``+ eps`` an ``fc2``
  output), +1 ``Reshape`` for several mixtures; then the mixtures' ``MatMul``
  with the warehouse, the batched ``MatMul`` with the input and its three
  ``Reshape`` (kernel, input, output): 12 for a 1x1 layer with one
  mixture; a 3x3 layer adds the im2col ``Conv`` (14), the position-major
  form (deep layers) a ``Transpose`` and a ``ReduceSum`` (16).
* DDF (``mul``): the channel branch 4 (pooling, ``Conv``, ``Relu``,
  ``Conv``), the spatial ``Conv``, each filter's ``Reshape`` to the
  layout of the product and its norm (``ReduceL2``, ``Clip``, ``Div``; one
  ``LpNormalization`` after simplification), the im2col ``Conv`` (both
  filters' scales in its weights), the columns' ``Reshape``, the spatial
  ``Mul``, the ``MatMul``, the output ``Reshape``: 18, 14 simplified. In
  ``n`` channel chunks (large maps) ``4 * (n - 1) + 3`` more: the
  columns' four nodes per chunk, two ``Split`` and a ``Concat``. The
  ``BatchNormalization`` after it folds into it (its bias: an ``Add``).

So, against the static ResNet-50's 126 nodes (4x: 504): DDF-mul (16
layers) ``126 + 16 * 14 = 350`` (2.8x) unchunked; at 224x224 with 4, 4
and 2 chunks in stages 1-3 ``350 + 3 * 15 + 4 * 15 + 6 * 7 = 497``
(3.9x). ODConv-1x (48 layers, 32 of them
1x1, each ``n`` nodes plus its BN less the static conv): at least ``126 +
32 * 9 + 16 * 11 = 590`` (4.7x), ``126 + 32 * 9 + 9 * 11 + 7 * 14 = 611``
(4.8x) with the per-sample kernels on the 7 early 3x3 layers: the 1x1
layers alone take ``32 * 9 = 288`` of the 378 nodes that 4x leaves, so 4x
is out of reach without a fused operator. KW-1x (50 layers): at least
``126 + 50 * 12 = 726`` (5.8x) even if every layer were a one-mixture 1x1;
the export is 828 (6.6x): 4x is out of reach too.

torch only.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

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


def im2col(x: torch.Tensor,
           kernel_size: Pair,
           stride: Pair,
           padding: Pair,
           dilation: Pair,
           scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The im2col columns of ``x`` [B, C, H, W]: [B, C*kh*kw, H', W'] in
    ``F.unfold``'s order (channel, then kernel position), by one grouped
    ``Conv`` with one-hot weights; a 1x1 kernel is the (padded, strided) input
    itself (strided by an ``AveragePool`` of 1x1 windows).

    ``scale`` [C*kh*kw] (a constant): column ``i`` times ``scale[i]``, folded
    into the one-hot weights (no node); for a 1x1 kernel one ``Mul``.
    """
    if tuple(kernel_size) == (1, 1):
        if tuple(padding) != (0, 0):
            x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
        if tuple(stride) != (1, 1):
            # One AveragePool of 1x1 windows (slicing: a Slice per axis).
            x = F.avg_pool2d(x, 1, tuple(stride))
        if scale is not None:
            x = x * scale.to(x.dtype).view(1, -1, 1, 1)
        return x
    channels = int(x.shape[1])
    weight = _one_hot_weight(channels, kernel_size, x)
    if scale is not None:
        weight = weight * scale.to(x.dtype).view(-1, 1, 1, 1)
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


def fold_norm(weight: torch.Tensor, bias: Optional[torch.Tensor],
              norm: nn.Module) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(W, b)`` of ``norm(F.linear(v, weight, bias))`` as one linear map.

    An eval-mode ``BatchNorm1d`` is folded into ``weight`` [out, in] (an
    ``nn.Identity`` leaves it); None for a norm that depends on the batch
    (training BN, ``LayerNorm``).
    """
    weight = weight.flatten(1)
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    if isinstance(norm, nn.Identity):
        return weight, bias
    if not isinstance(norm, nn.BatchNorm1d) or norm.training or \
            norm.running_mean is None:
        return None
    scale = torch.rsqrt(norm.running_var + norm.eps)
    shift = -norm.running_mean * scale
    if norm.weight is not None:
        scale = scale * norm.weight
        shift = shift * norm.weight + norm.bias
    return weight * scale[:, None], bias * scale + shift


def _as_1x1(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(int(weight.shape[0]), -1, 1, 1)


def odconv_attentions(layer,
                      x: torch.Tensor,
                      spatial_repeats: int = 1,
                      channel_repeats: int = 1):
    """ODConv with one kernel: ``(alpha_c [B, C_in * channel_repeats, 1, 1],
    alpha_f [B, C_out, 1, 1] | None, alpha_s [B, spatial_repeats * kh*kw, 1,
    1] | None)`` as one branch of 1x1 ``Conv`` nodes on the pooled map: the
    hidden ``fc`` with the attention BN folded in, then ONE ``Conv`` for
    every head (the temperature divided into its weights; the spatial head's
    rows repeated ``spatial_repeats`` times, the scale of channel-major
    im2col columns or tap maps; each channel head row ``channel_repeats``
    times in a row, the channel scale of channel-major columns) and one
    ``Sigmoid``, split in three. None where the branch does not fold
    (several kernels, a training-mode or layer norm): the layer's own
    attentions are used.

    The layer computed its attentions before its path ran; under export
    those nodes are then unused and the exporter drops them.
    """
    att = layer.attention
    if layer.kernel_num != 1:
        return None
    hidden = fold_norm(att.fc.weight, att.fc.bias, att.bn)
    if hidden is None:
        return None
    heads = [att.channel_fc]
    if not att.is_depthwise:
        heads.append(att.filter_fc)
    sizes = [layer.in_channels * channel_repeats] + [layer.out_channels] * (
        len(heads) - 1)
    weights = [h.weight.flatten(1) for h in heads]
    biases = [h.bias for h in heads]
    if channel_repeats > 1:
        weights[0] = weights[0].unsqueeze(1).expand(-1, channel_repeats,
                                                    -1).reshape(sizes[0], -1)
        biases[0] = biases[0].unsqueeze(1).expand(-1,
                                                  channel_repeats).reshape(-1)
    if att.num_positions > 1:
        # Repeated by an Expand to a constant shape (``repeat`` exports as
        # a Tile of a computed shape that the simplifier does not fold).
        positions, hidden_channels = att.num_positions, att.hidden_channels
        weights.append(
            att.spatial_fc.weight.reshape(1, positions,
                                          hidden_channels).expand(
                                              spatial_repeats, positions,
                                              hidden_channels).reshape(
                                                  -1, hidden_channels))
        biases.append(
            att.spatial_fc.bias.reshape(1, positions).expand(
                spatial_repeats, positions).reshape(-1))
        sizes.append(spatial_repeats * att.num_positions)
    temperature = layer.temperature.to(x.dtype)
    pooled = x.mean((2, 3), keepdim=True)
    s = F.relu(
        F.conv2d(pooled,
                 _as_1x1(hidden[0]).to(x.dtype), hidden[1].to(x.dtype)))
    logits = F.conv2d(s, _as_1x1(torch.cat(weights) / temperature),
                      torch.cat(biases) / temperature)
    parts = list(torch.sigmoid(logits).split(sizes, 1))
    channel = parts.pop(0)
    filt = parts.pop(0) if not att.is_depthwise else None
    spatial = parts.pop(0) if att.num_positions > 1 else None
    return channel, filt, spatial


def _odconv_scaled_columns(layer, x, channel, filt, spatial) -> torch.Tensor:
    """One kernel, larger than 1x1: ``alpha_c * x``, its im2col columns
    scaled by ``alpha_s`` (both [B, *, 1, 1], ``alpha_s`` repeated per input
    channel: no reshape), the static kernel as a 1x1 ``Conv`` over them, then
    ``alpha_f`` and the bias."""
    cols = im2col(x * channel, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation)
    cols = cols * spatial
    weight = layer.weight.reshape(layer.out_channels, -1, 1, 1)
    out = F.conv2d(cols, weight.to(cols.dtype), None, 1, 0, 1, layer.groups)
    return _scale_and_bias(layer, out, filt)


def _one_hot_tap_sum(channels: int, kernel_size: Pair,
                     like: torch.Tensor) -> torch.Tensor:
    """[C, kh*kw, kh, kw]: group ``c`` of a grouped ``Conv`` sums its input
    ``p`` shifted to kernel position ``p``."""
    kh, kw = kernel_size
    eye = torch.eye(kh * kw, dtype=like.dtype, device=like.device)
    return eye.view(1, kh * kw, kh, kw).repeat(channels, 1, 1, 1)


def odconv_tap_maps(layer, x, channel, filt, spatial) -> torch.Tensor:
    """One kernel, larger than 1x1, the other exact form: ``Z = Conv1x1(alpha_c
    * x, W as [C_out*kh*kw, C_in/g])`` at the input's resolution, ``Z *
    alpha_s``, then the sum over the taps as ONE grouped ``Conv``
    (``groups=C_out``, one-hot weights, the layer's stride, padding and
    dilation), then ``alpha_f`` and the bias.

    ``Z`` is computed at every input pixel: ``stride**2`` times the layer's
    FLOPs on strided layers. :data:`ODCONV_ONE_KERNEL_FORM` chooses
    between this form and the scaled columns.
    """
    kh, kw = layer.kernel_size
    positions = kh * kw
    c_out = layer.out_channels
    weight = layer.weight.reshape(c_out, -1, kh, kw).permute(0, 2, 3, 1)
    weight = weight.reshape(c_out * positions, -1, 1, 1)
    z = F.conv2d(x * channel, weight.to(x.dtype), None, 1, 0, 1, layer.groups)
    z = z * spatial  # alpha_s repeated per output channel
    out = F.conv2d(z, _one_hot_tap_sum(c_out, (kh, kw), z), None, layer.stride,
                   layer.padding, layer.dilation, c_out)
    return _scale_and_bias(layer, out, filt)


def _scale_and_bias(layer, out: torch.Tensor,
                    filt: Optional[torch.Tensor]) -> torch.Tensor:
    if filt is not None:
        out = out * filt
    if layer.bias is not None:
        out = out + layer.bias.view(1, -1, 1, 1).to(out.dtype)
    return out


def odconv_sample_kernels(layer, x, channel, filt, spatial) -> torch.Tensor:
    """One kernel, larger than 1x1, ``groups=1``: per-sample kernels.

    ``alpha_c`` and ``alpha_s`` both as [B, C_in*kh*kw, 1, 1] in the im2col
    column order (:func:`odconv_attentions` with the channel rows repeated
    per tap, the spatial rows per channel); the kernels ``W * (alpha_c *
    alpha_s)`` [B, C_out, C_in*kh*kw] (one ``Mul`` of the small attention
    tensors, one ``Reshape``, one ``Mul`` with the static kernel), the
    im2col columns of ``x`` unscaled, one batched ``MatMul``, then
    ``alpha_f`` and the bias on the output: 8 nodes after the attention
    branch, no product over an input map. Chosen where a sample's kernel is
    no larger than its columns (``C_out <= H' * W'``, early layers) by
    :data:`ODCONV_ONE_KERNEL_FORM` ``'kernels'``.
    """
    c_out = layer.out_channels
    depth = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    scale = (channel * spatial).reshape(-1, 1, depth)
    weight = layer.weight.reshape(c_out, depth).to(x.dtype) * scale
    cols = im2col(x, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation)
    h_out, w_out = int(cols.shape[2]), int(cols.shape[3])
    out = torch.matmul(weight, cols.reshape(-1, depth, h_out * w_out))
    return _scale_and_bias(layer, out.reshape(-1, c_out, h_out, w_out), filt)


#: ODConv with one kernel larger than 1x1 under export: ``'columns'``
#: (:func:`_odconv_scaled_columns`), ``'taps'`` (:func:`odconv_tap_maps` on
#: stride-1 layers, the columns elsewhere) or ``'kernels'``
#: (:func:`odconv_sample_kernels` on early layers, the columns elsewhere).
#: benchmarks/odconv_export_forms.py times them in ONNX Runtime: on an
#: AVX-512 CPU (2026-12-07, 2 threads, ODConv-1x ResNet-50 / ResNet-50)
#: 'kernels' 2.08x at batch 8 and 1.77x at batch 1, 'columns' 2.25x and
#: 1.85x, 'taps' 2.71x and 2.26x.
ODCONV_ONE_KERNEL_FORM = 'kernels'


def odconv_uses_tap_maps(layer) -> bool:
    """Whether the one-kernel export form is :func:`odconv_tap_maps`."""
    return ODCONV_ONE_KERNEL_FORM == 'taps' and \
        tuple(layer.stride) == (1, 1)


def odconv_uses_sample_kernels(layer, x: torch.Tensor) -> bool:
    """Whether the one-kernel export form is :func:`odconv_sample_kernels`."""
    if ODCONV_ONE_KERNEL_FORM != 'kernels' or layer.groups != 1:
        return False
    h_out, w_out = layer.output_hw(int(x.shape[2]), int(x.shape[3]))
    return layer.out_channels <= h_out * w_out


def odconv(layer, x, channel, filt, spatial, kernel) -> torch.Tensor:
    """ODConv.

    * One kernel: the attentions again as one folded branch
      (:func:`odconv_attentions`, [B, C, 1, 1] scales, no reshapes). A 1x1
      kernel: one static ``Conv`` of ``alpha_c * x``; larger kernels:
      :func:`_odconv_scaled_columns` (the layer's FLOPs in one static conv,
      no per-sample kernel), :func:`odconv_tap_maps` or
      :func:`odconv_sample_kernels` (:data:`ODCONV_ONE_KERNEL_FORM`). Then
      ``alpha_f`` and the bias.
    * Several kernels: the per-sample kernels ``(alpha_w @ W) * alpha_s``
      by :func:`per_sample_conv`, with ``alpha_c``/``alpha_f`` folded into
      them on early layers (:func:`odconv_folds`), else scaling ``x`` and
      the output.
    """
    if kernel is None:
        taps = spatial is not None and odconv_uses_tap_maps(layer)
        kernels = spatial is not None and not taps and \
            odconv_uses_sample_kernels(layer, x)
        repeats = layer.out_channels if taps else layer.in_channels
        positions = layer.kernel_size[0] * layer.kernel_size[1]
        folded = odconv_attentions(layer, x, repeats,
                                   positions if kernels else 1)
        if folded is None:
            return _odconv_unfolded(layer, x, channel, filt, spatial)
        channel, filt, spatial = folded
        if spatial is None:
            # 1x1: the input padded and strided first (also: OpenVINO
            # 2026.4 does not compile a strided Conv of a map scaled by a
            # Split output).
            x = im2col(x, (1, 1), layer.stride, layer.padding, (1, 1))
            weight = layer.weight.reshape(layer.out_channels,
                                          *layer.weight.shape[-3:])
            out = F.conv2d(x * channel, weight.to(x.dtype), None, 1, 0, 1,
                           layer.groups)
            return _scale_and_bias(layer, out, filt)
        if taps:
            form = odconv_tap_maps
        elif kernels:
            form = odconv_sample_kernels
        else:
            form = _odconv_scaled_columns
        return form(layer, x, channel, filt, spatial)
    if odconv_folds(layer, x):
        weight = folded_weight(layer, channel, filt, spatial, kernel)
        return per_sample_conv(x, weight.to(x.dtype), layer.bias, layer.stride,
                               layer.padding, layer.dilation, layer.groups)
    weight = layer.aggregate_weight(spatial, kernel)
    x = x * channel[:, :, None, None].to(x.dtype)
    out = per_sample_conv(x, weight.to(x.dtype), None, layer.stride,
                          layer.padding, layer.dilation, layer.groups)
    return layer.filter_and_bias(out, filt)


def _odconv_unfolded(layer, x, channel, filt, spatial) -> torch.Tensor:
    """One kernel with the layer's own [B, C] attentions (a branch that does
    not fold): the reference for a 1x1 kernel, else the scaled columns."""
    if spatial is None:
        return layer.reference_from_attentions(x, channel, filt, None, None)
    as_map = [
        None if a is None else a[:, :, None, None].to(x.dtype)
        for a in (channel, filt, spatial)
    ]
    as_map[2] = as_map[2].repeat(1, layer.in_channels, 1, 1)
    return _odconv_scaled_columns(layer, x, *as_map)


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
    kernel is most of the time otherwise). The attentions are taken again from
    :func:`kw_attention` where it folds (its zero-cell and ``eps`` columns then
    two zero rows of the warehouse).

    * Whole-position cells (one output and one input block), deep layers
      (:func:`kw_position_major`): the mixtures [B, k*k, C_out, C_in] (one
      GEMM of all the samples' attentions) times the position-major
      im2col columns [B, k*k, C_in, H'W'], summed over the positions.
    * Whole-position cells, early layers: the kernels as ``cells^T @
      attention^T`` (the attentions computed cell-major: no ``Transpose``),
      [B, C_out * C_in/g, k*k], already in the conv layout; then
      :func:`per_sample_conv`.
    * 1x1 kernels: ``mixtures [B, o, i, c_o, c_i] @ x [B, 1, i, c_i, HW]``
      summed over the input blocks.
    * Other layouts: the reference's kernel assembly, then
      :func:`per_sample_conv`.
    """
    cells = layer._cell_rows()
    g_s, g_o, g_i, c_o, c_i = layer._kw_layout
    pointwise = g_s == 1 and layer.groups == 1
    whole = (g_o, g_i) == (1, 1)
    position_major = not pointwise and whole and layer.groups == 1 and \
        kw_position_major(layer, x)
    cell_major = not pointwise and whole and not position_major
    folded = kw_attention(layer, x, cell_major)
    if folded is not None:
        if not (pointwise or whole):
            # The reference's kernel assembly below.
            attention = folded[..., :-2]
        else:  # the zero cell and the eps column as zero rows
            attention = folded
            cells = torch.cat([cells, cells.new_zeros(2, cells.shape[1])])
    elif cell_major:
        attention = attention.transpose(1, 2)
    attention = attention.to(cells.dtype)
    if pointwise:
        x = im2col(x, (1, 1), layer.stride, layer.padding, (1, 1))
        h_out, w_out = int(x.shape[2]), int(x.shape[3])
        mixtures = torch.matmul(attention, cells)
        if g_i > 1:
            mixtures = mixtures.view(-1, g_o, g_i, c_o, c_i)
            x = x.reshape(-1, 1, g_i, c_i, h_out * w_out)
        else:
            mixtures = mixtures.view(-1, g_o * c_o, c_i)
            x = x.reshape(-1, c_i, h_out * w_out)
        out = torch.matmul(mixtures.to(x.dtype), x)
        if g_i > 1:
            out = out.sum(2)
        out = out.reshape(-1, layer.out_channels, h_out, w_out)
        if layer.bias is not None:
            out = out + layer.bias.reshape(1, -1, 1, 1).to(out.dtype)
        return out
    if position_major:
        return _kw_position_major(layer, x, attention, cells)
    if whole:
        kernel = torch.matmul(cells.t(), attention)
        kernel = kernel.view(-1, *layer.weight_shape)
    else:
        kernel = layer.assemble_kernel(attention)
    return per_sample_conv(x, kernel.to(x.dtype), layer.bias, layer.stride,
                           layer.padding, layer.dilation, layer.groups)


def kw_attention(layer,
                 x: torch.Tensor,
                 cell_major: bool = False) -> Optional[torch.Tensor]:
    """KernelWarehouse's attentions in few nodes.

    [B, m, n + 2] (``cell_major``: [B, n + 2, m], the layout ``cells^T @
    attention^T`` reads, by permuted ``fc2`` rows: no ``Transpose``; one
    mixture: [B, n + 2], no ``Reshape``): the pooled ``fc1`` with the norm
    folded in, ``ReLU``, ``fc2``, then the
    contrasting attention ``(1 - tau) * z / (sum|z| + eps) + tau * beta``
    (the reference's max-abs rescaling, an overflow guard, left out: the
    same value), the ``tau`` terms only where ``tau != 0``.

    Column ``n`` is the zero cell's, column ``n + 1`` a constant ``eps``
    (``fc2`` given a zero row with bias ``eps``): ``sum|z|`` over the row
    then includes the ``+ eps`` (no ``Add``). :func:`kernel_warehouse`
    multiplies both columns by zero rows. None where it does not fold (a
    basis-mixed attention, a layer norm): the layer's own attentions are
    used; under export those nodes are then unused and the exporter drops
    them.
    """
    att = layer.attention
    if att is None or getattr(att, 'num_basis', None) is not None:
        return None
    hidden = fold_norm(att.fc1.weight, att.fc1.bias, att.norm1)
    if hidden is None or not isinstance(att.act1, nn.ReLU):
        return None
    m, cols = att.num_mixtures, att.num_cells + 2
    weight = att.fc2.weight.reshape(m, cols - 1, -1)
    weight = torch.cat([weight, weight.new_zeros(m, 1, weight.shape[2])], 1)
    bias = att.fc2.bias
    if bias is None:
        bias = weight.new_zeros(m * (cols - 1))
    bias = torch.cat(
        [bias.reshape(m, cols - 1),
         bias.new_full((m, 1), att.caf_eps)], 1)
    if cell_major:
        weight, bias = weight.transpose(0, 1), bias.t()
    pooled = x.mean((2, 3))
    s = F.relu(F.linear(pooled, hidden[0].to(x.dtype), hidden[1].to(x.dtype)))
    z = F.linear(s,
                 weight.reshape(m * cols, -1).to(x.dtype),
                 bias.reshape(-1).to(x.dtype))
    axis = 1 if cell_major else -1
    if m > 1:
        z = z.reshape(-1, cols, m) if cell_major else z.reshape(-1, m, cols)
    # Abs + ReduceSum: OpenVINO (2026.4) computes ReduceL1 wrongly here.
    z = z / z.abs().sum(axis, keepdim=True)
    tau = layer.temperature
    if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
        # Traced (ONNX, TorchScript): tau is a constant of the graph, its
        # terms only where it is not 0. torch.export cannot branch on it.
        tau = float(tau)
        if tau == 0.0:
            return z
    beta = torch.cat([layer.beta, layer.beta.new_zeros(m, 1)], 1)
    if cell_major:
        beta = beta.t()
    beta = beta.reshape(z.shape[1:]).to(z.dtype)
    # The eps column: tau * 0 + (1 - tau) * eps / sum, times a zero row.
    return (1.0 - tau) * z + tau * beta
