# Copyright (c) mmdyn contributors. All rights reserved.
"""The accelerated paths of :class:`~mmdyn.ops.ODConv2d`: each computes the
layer's ``forward_reference`` result another way (chosen by
:mod:`mmdyn.ops.accel.paths`).

* ``folded``: ``alpha_c``/``alpha_f`` folded into the per-sample kernel
  (the smaller tensor on high-resolution maps).
* ``scaled_columns``: one kernel, the static kernel times im2col columns
  scaled by ``alpha_s``/``alpha_c`` (no per-sample kernel).
* ``winograd`` and ``chunked``: the per-sample conv by Winograd
  F(2x2, 3x3), or with the kernels built into a reused workspace.
* :func:`mix_kernels`: the reference's kernel mixture with a memory-lean
  backward (it recomputes the mixed kernel instead of keeping it), the
  product the layer's ``'reference'`` path uses outside graph capture.

Each function receives the layer (attributes read: ``weight``, ``bias``,
the conv geometry, ``attention``) and the attentions of its input.

torch only.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .chunked import chunked_per_sample_conv2d
from .thresholds import THRESHOLDS
from .winograd import winograd_per_sample_conv2d


def _repeat_positions(rows: int) -> Tuple[int, int]:
    """Layout for scaling a [B, rows*P] kernel by a [B, P] attention.

    Broadcasting a [B, 1, P] factor over a [B, rows, P] view runs an inner
    loop of only P (9) elements; repeating the factor R times gives rows of
    9R contiguous elements, faster on CPU. Returns (R, rows / R), R the gcd
    of ``rows`` and ``THRESHOLDS['odconv']['scale_repeat']``.
    """
    repeat = math.gcd(rows, THRESHOLDS['odconv']['scale_repeat'])
    return repeat, rows // repeat


def mix_kernels_into(kernel: Optional[torch.Tensor],
                     bank: torch.Tensor,
                     spatial: torch.Tensor,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, rows*P] = (kernel [B, K] @ bank [K, rows*P]) * spatial [B, P],
    written into ``out`` when given; ``kernel`` None means one kernel with
    attention 1.

    No autograd: the forward of :class:`_MixKernels` and the
    chunked per-sample kernels.
    """
    batch, positions = spatial.shape
    repeat, rows = _repeat_positions(bank.shape[1] // positions)
    scale = spatial.repeat(1, repeat).unsqueeze(1)
    if out is None:
        out = bank.new_empty(batch, bank.shape[1])
    mixed = out.view(batch, rows, positions * repeat)
    if kernel is None or kernel.shape[1] == 1:
        # One kernel: a broadcast product, one pass over the output
        # (a [B, 1] x [1, N] matmul is an outer product MKL runs slowly).
        if kernel is not None:
            scale = scale * kernel.view(-1, 1, 1)
        torch.mul(bank.view(1, rows, positions * repeat), scale, out=mixed)
    else:
        torch.matmul(kernel, bank, out=out)
        mixed.mul_(scale)
    return out


class _MixKernels(torch.autograd.Function):
    """``(kernel @ bank) * spatial`` with a memory-lean backward.

    ``bank`` [K, rows*P], ``kernel`` [B, K], ``spatial`` [B, P] -> [B,
    rows*P]. Plain autograd would keep the mixed kernel, a [B, numel(W)]
    tensor per layer, for the spatial gradient; here it is recomputed in the
    backward by one cheap [B, K] x [K, numel(W)] matmul, and the output is
    scaled in place.
    """

    @staticmethod
    def forward(ctx, kernel, bank, spatial):
        ctx.save_for_backward(kernel, bank, spatial)
        return mix_kernels_into(kernel, bank, spatial)

    @staticmethod
    def backward(ctx, grad):
        kernel, bank, spatial = ctx.saved_tensors
        batch, positions = spatial.shape
        grad = grad.to(bank.dtype).contiguous()
        grad_kernel = grad_bank = grad_spatial = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            repeat, rows = _repeat_positions(bank.shape[1] // positions)
            scaled = (grad.view(batch, rows, positions * repeat) *
                      spatial.repeat(1, repeat).unsqueeze(1)).view(batch, -1)
            if ctx.needs_input_grad[0]:
                grad_kernel = scaled @ bank.t()
            if ctx.needs_input_grad[1]:
                grad_bank = kernel.t() @ scaled
        if ctx.needs_input_grad[2]:
            repeat, rows = _repeat_positions(bank.shape[1] // positions)
            mixed = (kernel @ bank).view(batch, rows, positions * repeat)
            grad_spatial = (grad.view_as(mixed) *
                            mixed).sum(1).view(batch, repeat, positions).sum(1)
        return grad_kernel, grad_bank, grad_spatial


def mix_kernels(kernel: torch.Tensor, bank: torch.Tensor,
                spatial: torch.Tensor) -> torch.Tensor:
    """[B, rows*P] = (kernel [B, K] @ bank [K, rows*P]) * spatial [B, P] in the
    dtype of ``bank`` (autocast off), with the memory-lean backward of
    :class:`_MixKernels`.

    Not for graph capture (the layer then mixes with plain ops).
    """
    dtype = bank.dtype
    kernel, spatial = kernel.to(dtype), spatial.to(dtype)
    with torch.autocast(bank.device.type, enabled=False):
        return _MixKernels.apply(kernel, bank, spatial)


def channel_scale(layer, channel, filt, c_out, c_in_g):
    """[B, C_out, C_in/g] product of the channel and filter attentions laid out
    as the kernel's (output, input-in-group) dimensions."""
    scale = None
    if channel is not None:
        groups = layer.groups
        scale = channel.view(-1, groups, 1,
                             c_in_g).expand(-1, groups, c_out // groups,
                                            c_in_g).reshape(-1, c_out, c_in_g)
    if filt is not None:
        f = filt[:, :, None]
        scale = f.expand(-1, c_out, c_in_g) if scale is None else (scale * f)
    return scale.to(layer.weight.dtype)


def folded_weight(layer, channel, filt, spatial, kernel) -> torch.Tensor:
    """The per-sample kernel with ``channel`` [B, C_in] and ``filt`` [B, C_out]
    folded into its input/output-channel dimensions (which equals scaling the
    input and the output): [B, C_out, C_in/g, kh, kw]."""
    bank = layer.weight
    c_out, c_in_g = bank.shape[1:3]
    positions = bank.shape[3] * bank.shape[4]
    if kernel is None:
        weight = bank
    else:
        # [B, K] x [K, numel(W)]: mixing before the spatial product is
        # the same sum with K times fewer multiplications.
        weight = kernel.to(bank.dtype) @ bank.flatten(1)
    fresh = kernel is not None and not torch.is_grad_enabled()
    scale = channel_scale(layer, channel, filt, c_out, c_in_g)
    if spatial is not None:
        scale = scale.unsqueeze(-1) * spatial.to(scale.dtype)[:, None, None, :]
    else:
        scale = scale.unsqueeze(-1).expand(-1, -1, -1, positions)
    weight = weight.reshape(-1, c_out, c_in_g, positions)
    weight = weight.mul_(scale) if fresh else weight * scale
    return weight.view(-1, *bank.shape[1:])


def folded(layer, x, channel, filt, spatial, kernel) -> torch.Tensor:
    """``alpha_c`` and ``alpha_f`` folded into the per-sample kernel, with the
    layer's bias."""
    weight = folded_weight(layer, channel, filt, spatial, kernel)
    return layer.per_sample_conv(x, weight, layer.bias)


def scaled_columns(layer, x, channel, filt, spatial, kernel) -> torch.Tensor:
    """One kernel: ``conv(alpha_c[b] * x_b, alpha_s[b] * W)`` scales input
    channel ``c`` and kernel position ``p`` of sample ``b``, which is
    scaling the im2col columns of (c, p): one GEMM of the static kernel,
    no per-sample kernel (cheaper when the kernel is larger than the
    columns). Then ``alpha_f`` and the bias."""
    h_out, w_out = layer.output_hw(int(x.shape[2]), int(x.shape[3]))
    positions = layer.attention.num_positions
    cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding,
                    layer.stride)  # [B, C_in * P, L]
    # -1 for the batch: no batch size baked into an exported graph.
    cols = cols.view(-1, layer.in_channels, positions, h_out * w_out)
    scale = (channel[:, :, None] * spatial[:, None, :]).to(cols.dtype)
    scale = scale.unsqueeze(-1)
    cols = cols * scale if torch.is_grad_enabled() else cols.mul_(scale)
    weight = layer.weight.view(layer.out_channels, -1)
    out = torch.matmul(
        weight.to(cols.dtype),
        cols.view(-1, layer.in_channels * positions, h_out * w_out))
    out = out.view(-1, layer.out_channels, h_out, w_out)
    return layer.filter_and_bias(out, filt)


def winograd(layer, x, channel, filt, spatial, kernel) -> torch.Tensor:
    """The per-sample conv of ``alpha_c * x`` by Winograd F(2x2, 3x3)
    (inference), then ``alpha_f`` and the bias."""
    x = x * channel[:, :, None, None]
    out = winograd_per_sample_conv2d(x, layer.weight, kernel, spatial,
                                     layer.padding)
    return layer.filter_and_bias(out, filt)


def _mix_chunk(layer, spatial, kernel, start: int, stop: int,
               out: torch.Tensor) -> torch.Tensor:
    """Samples ``start:stop``'s kernels (spatial and kernel attentions
    only) written into ``out`` [stop - start, numel(W)], no autograd."""
    dtype = layer.weight.dtype
    bank = layer.weight.flatten(1)
    kernel = None if kernel is None else kernel[start:stop].to(dtype)
    with torch.autocast(bank.device.type, enabled=False):
        if spatial is None:
            return torch.matmul(kernel, bank, out=out)
        return mix_kernels_into(kernel, bank, spatial[start:stop].to(dtype),
                                out)


def chunked(layer, x, channel, filt, spatial, kernel) -> torch.Tensor:
    """Kernels built a chunk of samples at a time into the reused workspace,
    then batch-1 convs of ``alpha_c * x`` (inference); then ``alpha_f`` and the
    bias."""
    x = x * channel[:, :, None, None]
    out = chunked_per_sample_conv2d(
        x, lambda start, stop, buffer: _mix_chunk(layer, spatial, kernel,
                                                  start, stop, buffer),
        layer.weight.shape[1:], layer.weight.dtype, layer.stride,
        layer.padding, layer.dilation, layer.groups)
    return layer.filter_and_bias(out, filt)


def reference(layer, x, channel, filt, spatial, kernel) -> torch.Tensor:
    """The reference forward, its kernel mixture by :func:`mix_kernels` (same
    values, a leaner backward) outside graph capture."""
    return layer.reference_from_attentions(
        x, channel, filt, spatial, kernel, mix=mix_kernels)
