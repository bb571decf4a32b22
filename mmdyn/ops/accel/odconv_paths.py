# Copyright (c) mmdyn contributors. All rights reserved.
"""The accelerated paths of :class:`~mmdyn.ops.ODConv2d`: each computes the
layer's ``forward_reference`` result another way (chosen by
:mod:`mmdyn.ops.accel.paths`).

* ``folded``: ``alpha_c``/``alpha_f`` folded into the per-sample kernel
  (the smaller tensor on high-resolution maps).
* ``scaled_columns``: one kernel, the static kernel times im2col columns
  scaled by ``alpha_s``/``alpha_c`` (no per-sample kernel).
* ``tap_gemm``: one kernel, one 1x1 conv (a oneDNN/MKL GEMM) of ``alpha_c
  * x`` to every tap's output channels, then the per-sample weighted sum
  of the shifted taps (no per-sample kernel, no im2col; inference and
  training). Its rule was measured on AVX-512 (2026-12-06), where it
  beats the Winograd C loop on ResNet stage-3 layers.
* ``pointwise_gemm``: a 1x1 layer with one kernel: ``alpha_f`` and
  ``alpha_c`` folded into per-sample [C_out, C_in] matrices, then one
  batched matmul with the input's pixels (no pass over the maps for the
  two scalings; inference and training, where it keeps only ``x`` and the
  small matrices).
* ``winograd`` and ``chunked``: the per-sample conv by Winograd
  F(2x2, 3x3), or with the kernels built into a reused workspace.
* :func:`mix_kernels`: the reference's kernel mixture with a memory-lean
  backward (it recomputes the mixed kernel instead of keeping it), the
  product the layer's ``'reference'`` path uses outside graph capture.

Each function receives the layer (attributes read: ``weight``, ``bias``,
the conv geometry, ``attention``) and the attentions of its input.

torch only.
"""
from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F

from ..capture import compiling, graph_capture
from ..per_sample_conv import pointwise_per_sample_conv
from . import tap_sum_cpu
from .chunked import (chunked_per_sample_conv2d, mix_kernels_into,
                      repeat_positions)
from .custom_ops import mixture_chunked_conv_op, winograd_conv_op
from .kept_copies import layer_copies
from .thresholds import THRESHOLDS
from .winograd import winograd_per_sample_conv2d


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
            repeat, rows = repeat_positions(bank.shape[1] // positions)
            scaled = (grad.view(batch, rows, positions * repeat) *
                      spatial.repeat(1, repeat).unsqueeze(1)).view(batch, -1)
            if ctx.needs_input_grad[0]:
                grad_kernel = scaled @ bank.t()
            if ctx.needs_input_grad[1]:
                grad_bank = kernel.t() @ scaled
        if ctx.needs_input_grad[2]:
            repeat, rows = repeat_positions(bank.shape[1] // positions)
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
    columns). Then ``alpha_f`` and the bias.

    Inference outside graph capture: :func:`_scaled_columns_inference`.
    """
    if not torch.is_grad_enabled() and not graph_capture():
        return _scaled_columns_inference(layer, x, channel, filt, spatial)
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


def _scaled_columns_inference(layer, x, channel, filt,
                              spatial) -> torch.Tensor:
    """:func:`scaled_columns` without autograd as ONE GEMM of the batch:

    the columns ``[C_in * kh * kw, B * H_out * W_out]`` written in one pass
    from a strided view of the padded input times ``alpha_c * alpha_s``
    (no ``unfold`` then scaling pass), the static kernel times them (MKL),
    and ``alpha_f`` applied while the result is put back in batch-major
    order. Measured on AVX-512 (2026-12-06, one thread): 1.3x nn.Conv2d at
    256 ch 14x14 and 512 ch 7x7, batch 8, where the unfold form takes 2.1x
    and 1.6x.
    """
    batch, c_in, h, w = (int(v) for v in x.shape)
    kh, kw = layer.kernel_size
    (s_h, s_w), (d_h, d_w) = layer.stride, layer.dilation
    h_out, w_out = layer.output_hw(h, w)
    p_h, p_w = layer.padding
    padded = F.pad(x, (p_w, p_w, p_h, p_h)).contiguous()
    h_pad, w_pad = h + 2 * p_h, w + 2 * p_w
    # [C_in, kh, kw, B, H', W']: im2col with the batch inside the columns.
    view = padded.as_strided((c_in, kh, kw, batch, h_out, w_out),
                             (h_pad * w_pad, d_h * w_pad, d_w,
                              c_in * h_pad * w_pad, s_h * w_pad, s_w))
    scale = channel.to(x.dtype).t()[:, None, :] * \
        spatial.to(x.dtype).t()[None, :, :]  # [C_in, P, B]
    cols = x.new_empty(c_in, kh, kw, batch, h_out, w_out)
    torch.mul(view, scale.view(c_in, kh, kw, batch, 1, 1), out=cols)
    out = torch.mm(
        layer.weight.view(layer.out_channels, -1).to(x.dtype),
        cols.view(c_in * kh * kw, -1))
    out = out.view(-1, batch, h_out, w_out).transpose(0, 1)
    # In the GEMM's dtype (autocast's, if on).
    result = out.new_empty(batch, layer.out_channels, h_out, w_out)
    if filt is None:
        result.copy_(out)
    else:
        torch.mul(out, filt.to(out.dtype)[:, :, None, None], out=result)
    if layer.bias is not None:
        result += layer.bias.view(1, -1, 1, 1).to(out.dtype)
    return result


def _tap_weights(weight: torch.Tensor, taps) -> torch.Tensor:
    """The static kernel [C_out, C_in, kh, kw] rearranged for one 1x1 conv to
    every tap of ``taps`` ((ky, kx) pairs): [T * C_out, C_in, 1, 1], tap-
    major."""
    c_out, c_in = weight.shape[:2]
    if len(taps) == weight.shape[2] * weight.shape[3]:
        rows = weight.permute(2, 3, 0, 1)
    else:
        rows = torch.stack([weight[:, :, ky, kx] for ky, kx in taps])
    return rows.reshape(-1, c_in, 1, 1)


def _scatter_tap_rows(grad_weight: torch.Tensor, taps,
                      rows: torch.Tensor) -> None:
    """Write the gradient of a class's tap-major kernel ``rows`` ([T * C_out,
    C_in] or [T * C_out, C_in, 1, 1], :func:`_tap_weights`' layout) into
    ``grad_weight`` [C_out, C_in, kh, kw] at its taps' positions."""
    rows = rows.reshape(len(taps), *grad_weight.shape[:2])
    for i, (_, ky, kx, _, _) in enumerate(taps):
        grad_weight[:, :, ky, kx] = rows[i]


def _layer_tap_weights(layer, taps) -> torch.Tensor:
    """:func:`_tap_weights` of the layer's kernel; in inference (outside graph
    capture) kept on the layer until the kernel changes (see
    :mod:`~mmdyn.ops.accel.kept_copies`: writes through ``.data``, like an EMA
    parameter swap, included), so that repeated forwards skip the transposing
    copy (one more copy of the kernel in memory)."""
    weight = layer.weight
    if torch.is_grad_enabled() or graph_capture():
        return _tap_weights(weight[0], taps)
    return layer_copies(layer, '_tap_gemm_weights').get(
        tuple(taps), weight, lambda weight: _tap_weights(weight[0], taps))


def _residue_classes(layer) -> dict:
    """The kernel taps grouped by the input pixels they read.

    Output pixel ``i`` reads input row ``i * s + ky * d - p`` through tap
    row ``ky``; written ``s * (i + q) + m`` with ``0 <= m < s``, the tap
    reads row ``i + q`` of the sub-image of rows ``m, m + s, ...``. Returns
    ``{(m_y, m_x): [(t, ky, kx, q_y, q_x), ...]}``, ``t`` the tap's
    position ``ky * kw + kx``. Stride 1: one class, ``q`` the tap's
    offset ``ky * d - p``.
    """
    classes = {}
    kh, kw = layer.kernel_size
    for ky in range(kh):
        q_y, m_y = divmod(ky * layer.dilation[0] - layer.padding[0],
                          layer.stride[0])
        for kx in range(kw):
            q_x, m_x = divmod(kx * layer.dilation[1] - layer.padding[1],
                              layer.stride[1])
            classes.setdefault((m_y, m_x), []).append(
                (ky * kw + kx, ky, kx, q_y, q_x))
    return classes


def _valid(q: int, size_in: int, size_out: int) -> Tuple[int, int]:
    """Output indices ``[start, stop)`` whose tap offset ``q`` lands inside a
    sub-image of ``size_in`` (the others read zero padding)."""
    return max(0, -q), min(size_out, size_in - q)


def _tap_windows(classes, maps, out_hw):
    """For each residue class (its taps' maps [B, T, C_out, h, w] in ``maps``)
    and tap: ``(class index, tap index in the class, kernel position t, output
    window, map window)``, windows as slices; taps that read padding only are
    left out."""
    h_out, w_out = out_hw
    windows = []
    for c, (taps, z) in enumerate(zip(classes, maps)):
        h_in, w_in = z.shape[-2:]
        for i, (t, _, _, q_y, q_x) in enumerate(taps):
            y0, y1 = _valid(q_y, h_in, h_out)
            x0, x1 = _valid(q_x, w_in, w_out)
            if y0 < y1 and x0 < x1:
                windows.append((c, i, t, (slice(y0, y1), slice(x0, x1)),
                                (slice(y0 + q_y,
                                       y1 + q_y), slice(x0 + q_x, x1 + q_x))))
    return windows


def _tap_sum(maps, windows, scale, out_shape) -> torch.Tensor:
    """``out[b, o, window_t] += scale[b, t, o] * map_t[b, o, shifted
    window_t]`` over the taps, in the maps' dtype (plain ops: in-place on a
    fresh output); ``scale`` [B, P, C_out, 1, 1]."""
    out = None
    if maps:
        scale = scale.to(maps[0].dtype)
    for c, i, t, (rows, cols), (map_rows, map_cols) in windows:
        part = maps[c][:, i, :, map_rows, map_cols]
        full = (rows.start, rows.stop, cols.start, cols.stop) == \
            (0, out_shape[2], 0, out_shape[3])
        if out is None and full:
            # A tap that covers the whole output starts the sum.
            out = torch.mul(part, scale[:, t])
            continue
        if out is None:
            out = part.new_zeros(out_shape)
        out[:, :, rows, cols].addcmul_(part, scale[:, t])
    if out is None:  # every tap reads padding only
        out = scale.new_zeros(out_shape)
    return out


def _tap_sum_backward(grad, maps, windows, scale, need_scale: bool):
    """The gradients of :func:`_tap_sum`: ``(grad_scale | None, grad_maps)``,
    each tap's map gradient written once into one zeroed tensor per residue
    class (plain autograd of the windows would allocate a zero gradient of
    every full map per tap and copy the output gradient per in-place add)."""
    grad_scale = torch.zeros_like(scale) if need_scale else None
    grad_maps = [torch.zeros_like(z) for z in maps]
    for c, i, t, (rows, cols), (map_rows, map_cols) in windows:
        g = grad[:, :, rows, cols]
        torch.mul(
            g, scale[:, t], out=grad_maps[c][:, i, :, map_rows, map_cols])
        if need_scale:
            part = maps[c][:, i, :, map_rows, map_cols]
            grad_scale[:, t, :, 0, 0] += (g * part).sum((2, 3))
    return grad_scale, grad_maps


def _tap_maps(xs: torch.Tensor, tap_weights, residues, stride):
    """Every residue class's 1x1 conv of its sub-image of ``xs`` (``alpha_c
    * x``) to its taps' output channels.

    ``tap_weights(taps)`` gives the [T * C_out, C_in, 1, 1] kernel of a
    class; ``residues`` the items of :func:`_residue_classes`. Returns
    ``(classes, maps, subs, weights)`` for the classes with pixels:
    ``((m_y, m_x), taps)``, the maps [B, T, C_out, h, w], the sub-images and
    the kernels.
    """
    classes, maps, subs, weights = [], [], [], []
    for (m_y, m_x), taps in residues:
        sub = xs if stride == (1, 1) else \
            xs[:, :, m_y::stride[0], m_x::stride[1]]
        if sub.shape[2] == 0 or sub.shape[3] == 0:
            continue
        weight = tap_weights([(ky, kx) for _, ky, kx, _, _ in taps])
        weight = weight.to(xs.dtype)
        z = F.conv2d(sub, weight)
        classes.append(((m_y, m_x), taps))
        subs.append(sub)
        weights.append(weight)
        maps.append(z.view(xs.shape[0], len(taps), -1, *z.shape[2:]))
    return classes, maps, subs, weights


class _TapGemm(torch.autograd.Function):
    """:func:`tap_gemm`'s product in training, keeping only its inputs.

    ``(x, alpha_c [B, C_in], kernel [C_out, C_in, kh, kw], scale [B, P,
    C_out, 1, 1])`` -> ``sum_t scale_t * shift_t(conv1x1(alpha_c * x,
    W_t))``. The ``kh*kw`` times larger tap maps are not kept for the
    backward (the memory of a static conv's training step): the backward
    computes them again (one more GEMM), then the tap sum's gradients
    (:func:`_tap_sum_backward`) and the 1x1 convs' (oneDNN's
    ``convolution_backward``). No double backward.
    """

    @staticmethod
    def forward(ctx, x, channel, weight, scale, residues, stride, out_shape):
        ctx.save_for_backward(x, channel, weight, scale)
        ctx.residues, ctx.stride, ctx.out_shape = residues, stride, out_shape
        return _tap_gemm_product(x, channel, weight, scale, residues, stride,
                                 out_shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x = ctx.saved_tensors[0]
        # In the dtype of x (float32 under autocast: the recomputed maps
        # and the 1x1 convs' gradients need one dtype).
        with torch.autocast(x.device.type, enabled=False):
            return _TapGemm._backward(ctx, grad.to(x.dtype))

    @staticmethod
    def _backward(ctx, grad):
        x, channel, weight, scale = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad = grad.contiguous()
        xs = x * channel[:, :, None, None]
        classes, maps, subs, weights = _tap_maps(
            xs, lambda taps: _tap_weights(weight, taps), ctx.residues,
            ctx.stride)
        windows = _tap_windows([taps for _, taps in classes], maps,
                               ctx.out_shape[2:])
        grad_scale, grad_maps = _tap_sum_backward(grad, maps, windows, scale,
                                                  needs[3])
        del maps
        need_x = needs[0] or needs[1]
        # Stride 1: one class, its sub-image all of xs.
        grad_xs = torch.zeros_like(xs) if need_x and \
            ctx.stride != (1, 1) else None
        grad_weight = torch.zeros_like(weight) if needs[2] else None
        for ((m_y, m_x),
             taps), sub, w, grad_map in zip(classes, subs, weights, grad_maps):
            grad_sub, grad_w, _ = torch.ops.aten.convolution_backward(
                grad_map.flatten(1, 2), sub, w, None, [1, 1], [0, 0], [1, 1],
                False, [0, 0], 1, [need_x, needs[2], False])
            if grad_w is not None:
                _scatter_tap_rows(grad_weight, taps, grad_w)
            if need_x and grad_xs is None:
                grad_xs = grad_sub
            elif need_x:
                grad_xs[:, :, m_y::ctx.stride[0],
                        m_x::ctx.stride[1]] += grad_sub
        grad_x = grad_channel = None
        if needs[0]:
            grad_x = grad_xs * channel[:, :, None, None]
        if needs[1]:
            grad_channel = (grad_xs * x).sum((2, 3))
        return grad_x, grad_channel, grad_weight, grad_scale, None, None, None


def _tap_gemm_product(x, channel, weight, scale, residues, stride,
                      out_shape) -> torch.Tensor:
    """The tap maps of ``alpha_c * x`` and their weighted shift-sum (plain
    ops: autograd through them under graph capture)."""
    xs = x * channel[:, :, None, None]
    classes, maps, _, _ = _tap_maps(xs,
                                    lambda taps: _tap_weights(weight, taps),
                                    residues, stride)
    windows = _tap_windows([taps for _, taps in classes], maps, out_shape[2:])
    return _tap_sum(maps, windows, scale, out_shape)


def tap_gemm(layer, x, channel, filt, spatial, kernel) -> torch.Tensor:
    """One kernel (``groups=1``): ``y = alpha_f * sum_t alpha_s[t] *
    shift_t(Z_t)`` with ``Z = conv1x1(alpha_c * x, W as [kh*kw*C_out, C_in])``.

    The conv's multiply-adds are one 1x1 conv (a GEMM for oneDNN/MKL) to
    every tap's output channels; the per-sample weighted sum of the
    shifted taps is then ``kh*kw`` fused multiply-adds over output-sized
    windows, ``alpha_f`` folded into their scales. With stride ``s`` the
    taps are grouped by the residue of the input rows/columns they read
    (:func:`_residue_classes`) and each group's 1x1 conv runs on its
    sub-image only: the GEMMs together have the layer's multiply-adds, as
    with stride 1. Zero padding is the part of a shifted tap outside its
    sub-image, skipped. Inference and training (:class:`_TapGemm`, which
    does not keep the tap maps; under graph capture autograd of the same
    ops).
    """
    batch = x.shape[0]
    h_out, w_out = layer.output_hw(int(x.shape[2]), int(x.shape[3]))
    c_out = layer.out_channels
    stride = tuple(layer.stride)
    channel = channel.to(x.dtype)
    # [B, P, C_out, 1, 1]: the scale of each tap and output channel.
    scale = spatial.to(x.dtype)[:, :, None]
    if filt is not None:
        scale = scale * filt.to(x.dtype)[:, None, :]
    else:
        scale = scale.expand(-1, -1, c_out).contiguous()
    scale = scale[..., None, None]
    residues = tuple(_residue_classes(layer).items())
    out_shape = (batch, c_out, h_out, w_out)
    lib = tap_sum_cpu.library_for(x)
    if lib is not None and not torch.is_grad_enabled():
        return _tap_gemm_c_forward(
            lib, x, channel, lambda taps: _layer_tap_weights(layer, taps),
            scale, layer.bias, residues, stride, out_shape)
    if lib is not None:
        out = _TapGemmC.apply(lib, x, channel, layer.weight[0].to(x.dtype),
                              scale, residues, stride, out_shape)
    elif not torch.is_grad_enabled():
        xs = x * channel[:, :, None, None]
        classes, maps, _, _ = _tap_maps(
            xs, lambda taps: _layer_tap_weights(layer, taps), residues, stride)
        windows = _tap_windows([taps for _, taps in classes], maps,
                               (h_out, w_out))
        out = _tap_sum(maps, windows, scale, out_shape)
    elif graph_capture():
        out = _tap_gemm_product(x, channel, layer.weight[0].to(x.dtype), scale,
                                residues, stride, out_shape)
    else:
        out = _TapGemm.apply(x, channel, layer.weight[0].to(x.dtype), scale,
                             residues, stride, out_shape)
    if layer.bias is not None:
        out = out + layer.bias.view(1, -1, 1, 1).to(out.dtype)
    return out


class _TapPlan(NamedTuple):
    """The GEMMs of :func:`tap_gemm`'s C form for one input.

    ``xs``: ``alpha_c * x`` pixel-major [B, H, W, C_in]; ``classes``: per
    residue class with pixels, ``(sub-image [B, h, w, C_in] view of xs, its
    kernel [T * C_out, C_in] (tap-major rows), taps, (m_y, m_x))``;
    ``per_sample``: tap-map elements of one sample; ``chunk``: samples per
    chunk of the reused buffer.
    """
    xs: torch.Tensor
    classes: list
    per_sample: int
    chunk: int


def _residue_pixels(t: torch.Tensor, residue, stride) -> torch.Tensor:
    """The pixels of a pixel-major [B, H, W, C] ``t`` that residue class
    ``(m_y, m_x)`` reads (all of ``t`` at stride 1)."""
    if stride == (1, 1):
        return t
    return t[:, residue[0]::stride[0], residue[1]::stride[1]]


def _tap_plan(x, channel, tap_weights, residues, stride,
              c_out: int) -> _TapPlan:
    """:class:`_TapPlan` of ``x``; ``tap_weights(taps)`` gives a class's kernel
    [T * C_out, C_in, 1, 1] (:func:`_tap_weights`)."""
    batch, c_in, height, width = (int(v) for v in x.shape)
    xs = x.new_empty(batch, height, width, c_in)
    torch.mul(
        x, channel.to(x.dtype)[:, :, None, None], out=xs.permute(0, 3, 1, 2))
    classes = []
    for (m_y, m_x), taps in residues:
        sub = _residue_pixels(xs, (m_y, m_x), stride)
        if sub.shape[1] == 0 or sub.shape[2] == 0:
            continue
        weight = tap_weights([(ky, kx) for _, ky, kx, _, _ in taps])
        classes.append((sub, weight.to(x.dtype).view(-1,
                                                     c_in), taps, (m_y, m_x)))
    per_sample = sum(sub.shape[1] * sub.shape[2] * len(taps) * c_out
                     for sub, _, taps, _ in classes)
    chunk = THRESHOLDS['odconv']['tap_gemm_chunk_bytes'] // max(
        1, per_sample * x.element_size())
    return _TapPlan(xs, classes, per_sample, max(1, min(batch, chunk)))


def _tap_chunks(plan: _TapPlan, c_out: int):
    """For each chunk of samples: ``(start, stop, [(class, offset of its maps
    in the chunk's buffer, their size)])``."""
    batch = plan.xs.shape[0]
    for start in range(0, batch, plan.chunk):
        stop = min(batch, start + plan.chunk)
        blocks, base = [], 0
        for item in plan.classes:
            sub, _, taps, _ = item
            size = (stop - start) * sub.shape[1] * sub.shape[2] * \
                len(taps) * c_out
            blocks.append((item, base, size))
            base += size
        yield start, stop, blocks


def _sum_table(blocks, c_out: int) -> torch.Tensor:
    """The tap table of :func:`~mmdyn.ops.accel.tap_sum_cpu.tap_sum` for a
    chunk's ``blocks`` (:func:`_tap_chunks`): one row ``(base, pix, h, w, qy,
    qx, s)`` per tap of every class."""
    rows = []
    for (sub, _, taps, _), base, _ in blocks:
        h, w = sub.shape[1:3]
        rows += [(base + i * c_out, len(taps) * c_out, h, w, q_y, q_x, t)
                 for i, (t, _, _, q_y, q_x) in enumerate(taps)]
    # view: [0, 7] when every class is empty (the output is the bias).
    return torch.tensor(
        rows, dtype=torch.int64).view(-1, tap_sum_cpu.TAP_FIELDS)


def _class_table(taps, c_out: int) -> torch.Tensor:
    """The tap table of :func:`~mmdyn.ops.accel.tap_sum_cpu.tap_sum_backward`
    for one class: one row ``(offset in a pixel, qy, qx, s)`` per tap."""
    return torch.tensor([(i * c_out, q_y, q_x, t)
                         for i, (t, _, _, q_y, q_x) in enumerate(taps)],
                        dtype=torch.int64)


def _tap_maps_into(buffer, blocks, start: int, stop: int) -> None:
    """The chunk's tap maps: one GEMM per class into ``buffer``."""
    for (sub, weight, _, _), base, size in blocks:
        torch.mm(
            sub[start:stop].reshape(-1, weight.shape[1]),
            weight.t(),
            out=buffer[base:base + size].view(-1, weight.shape[0]))


def _tap_gemm_c_forward(lib, x, channel, tap_weights, scale, bias, residues,
                        stride, out_shape) -> torch.Tensor:
    """:func:`tap_gemm`'s product with the C tap sum (no autograd).

    ``alpha_c * x`` is written pixel-major (NHWC), so each residue class's
    1x1 conv is one GEMM ``[pixels, C_in] x [C_in, T * C_out]`` whose output
    holds every pixel's taps contiguously; the C loop
    (:func:`~mmdyn.ops.accel.tap_sum_cpu.tap_sum`) reads each once and
    writes the NCHW output with the bias. The samples go a chunk at a time
    through one reused buffer of at most ``tap_gemm_chunk_bytes``
    (:data:`THRESHOLDS` ``['odconv']``; one sample at least).
    """
    c_out = out_shape[1]
    plan = _tap_plan(x, channel, tap_weights, residues, stride, c_out)
    scale = scale.reshape(x.shape[0], -1, c_out).to(x.dtype).contiguous()
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    out = x.new_empty(out_shape)
    buffer = x.new_empty(plan.chunk * plan.per_sample)
    for start, stop, blocks in _tap_chunks(plan, c_out):
        _tap_maps_into(buffer, blocks, start, stop)
        tap_sum_cpu.tap_sum(lib, buffer, _sum_table(blocks, c_out),
                            scale[start:stop], bias, out[start:stop])
    return out


class _TapGemmC(torch.autograd.Function):
    """:func:`tap_gemm`'s product in training with the C loops.

    ``(x, alpha_c [B, C_in], kernel [C_out, C_in, kh, kw], scale [B, P,
    C_out])`` -> ``sum_t scale_t * shift_t(Z_t)``, ``Z`` the pixel-major
    GEMMs of :func:`_tap_gemm_c_forward`. Keeps only its inputs; the
    backward computes the tap maps again (only for the scale's gradient),
    the maps' gradients with the C loop
    (:func:`~mmdyn.ops.accel.tap_sum_cpu.tap_sum_backward`), then two GEMMs
    per class (input and kernel gradients), chunk by chunk. No double
    backward.
    """

    @staticmethod
    def forward(ctx, lib, x, channel, weight, scale, residues, stride,
                out_shape):
        ctx.save_for_backward(x, channel, weight, scale)
        # The library the forward used (a switch turned off in between
        # does not leave the backward without it).
        ctx.lib, ctx.residues, ctx.stride = lib, residues, stride
        return _tap_gemm_c_forward(lib, x, channel,
                                   lambda taps: _tap_weights(weight, taps),
                                   scale, None, residues, stride, out_shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, channel, weight, scale = ctx.saved_tensors
        lib = ctx.lib
        needs = ctx.needs_input_grad[1:]
        batch, c_in = x.shape[:2]
        c_out = weight.shape[0]
        # Pixel-major, as the maps: the loop reads C contiguous channels.
        grad = grad.to(x.dtype).permute(0, 2, 3, 1).contiguous()
        plan = _tap_plan(x, channel, lambda taps: _tap_weights(weight, taps),
                         ctx.residues, ctx.stride, c_out)
        scale_rows = scale.reshape(batch, -1, c_out).to(x.dtype).contiguous()
        grad_scale = torch.zeros_like(scale_rows) if needs[3] else None
        need_x = needs[0] or needs[1]
        grad_xs = None
        if need_x:
            grad_xs = x.new_empty(plan.xs.shape) if ctx.stride == (1, 1) \
                else x.new_zeros(plan.xs.shape)
        grad_rows = [torch.zeros_like(w) for _, w, _, _ in plan.classes] \
            if needs[2] else None
        maps = x.new_empty(plan.chunk * plan.per_sample) if needs[3] else None
        grad_maps = x.new_empty(plan.chunk * plan.per_sample)
        tables = [_class_table(taps, c_out) for _, _, taps, _ in plan.classes]
        for start, stop, blocks in _tap_chunks(plan, c_out):
            if maps is not None:
                _tap_maps_into(maps, blocks, start, stop)
            for c, ((sub, w, _, (m_y, m_x)), base, size) in enumerate(blocks):
                shape = (stop - start, *sub.shape[1:3], w.shape[0])
                g = grad_maps[base:base + size].view(shape)
                z = None if maps is None else maps[base:base +
                                                   size].view(shape)
                tap_sum_cpu.tap_sum_backward(
                    lib, z, tables[c], scale_rows[start:stop],
                    grad[start:stop], g,
                    None if z is None else grad_scale[start:stop])
                g = g.view(-1, w.shape[0])
                if need_x:
                    part = _residue_pixels(grad_xs[start:stop], (m_y, m_x),
                                           ctx.stride)
                    if part.is_contiguous():
                        torch.mm(g, w, out=part.view(-1, c_in))
                    else:
                        part.copy_((g @ w).view(part.shape))
                if grad_rows is not None:
                    grad_rows[c].addmm_(g.t(),
                                        sub[start:stop].reshape(-1, c_in))
        grad_x = grad_channel = grad_weight = None
        if need_x:
            grad_xs = grad_xs.permute(0, 3, 1, 2)
            if needs[0]:
                grad_x = torch.empty_like(
                    x, memory_format=torch.contiguous_format)
                torch.mul(
                    grad_xs, channel.to(x.dtype)[:, :, None, None], out=grad_x)
            if needs[1]:
                grad_channel = (grad_xs * x).sum((2, 3))
        if grad_rows is not None:
            grad_weight = torch.zeros_like(weight)
            for (_, _, taps, _), rows in zip(plan.classes, grad_rows):
                _scatter_tap_rows(grad_weight, taps, rows)
        if grad_scale is not None:
            grad_scale = grad_scale.view(scale.shape).to(scale.dtype)
        return (None, grad_x, grad_channel, grad_weight, grad_scale, None,
                None, None)


def winograd(layer, x, channel, filt, spatial, kernel) -> torch.Tensor:
    """The per-sample conv of ``alpha_c * x`` by Winograd F(2x2, 3x3)
    (inference), then ``alpha_f`` and the bias."""
    x = x * channel[:, :, None, None]
    if compiling():  # the C loops as one opaque operator of the graph
        out = winograd_conv_op(x, layer.weight, kernel, spatial,
                               list(layer.padding))
    else:
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
    if compiling():  # one opaque operator of the graph
        out = mixture_chunked_conv_op(x, layer.weight, kernel, spatial,
                                      list(layer.stride), list(layer.padding),
                                      list(layer.dilation), layer.groups)
        return layer.filter_and_bias(out, filt)
    out = chunked_per_sample_conv2d(
        x, lambda start, stop, buffer: _mix_chunk(layer, spatial, kernel,
                                                  start, stop, buffer),
        layer.weight.shape[1:], layer.weight.dtype, layer.stride,
        layer.padding, layer.dilation, layer.groups)
    return layer.filter_and_bias(out, filt)


def pointwise_gemm(layer, x, channel, filt, spatial, kernel) -> torch.Tensor:
    """A 1x1, stride-1, unpadded, ``groups=1`` layer with one kernel (no
    spatial or kernel attention): ``y_b = (alpha_f[b] * W * alpha_c[b]) @ x_b``
    over the pixels, as one [B, C_out, C_in] x [B, C_in, H*W] batched matmul (+
    bias)."""
    B, c_in = x.shape[:2]
    matrix = layer.weight.reshape(layer.out_channels, c_in).to(x.dtype)
    if channel is not None:
        matrix = matrix * channel.to(x.dtype)[:, None, :]
    if filt is not None:
        matrix = matrix * filt.to(x.dtype)[:, :, None]
    return pointwise_per_sample_conv(x, matrix.expand(B, -1, -1), layer.bias)


def reference(layer, x, channel, filt, spatial, kernel) -> torch.Tensor:
    """The reference forward, its kernel mixture by :func:`mix_kernels` (same
    values, a leaner backward) outside graph capture."""
    return layer.reference_from_attentions(
        x, channel, filt, spatial, kernel, mix=mix_kernels)
