# Copyright (c) mmdyn contributors. All rights reserved.
"""Convolution of each sample with its own kernel.

Every dynamic convolution (DyConv, ODConv, KernelWarehouse) ends with the
same operation: sample ``b`` of ``x`` is convolved with kernel ``weight[b]``.
This module holds the interchangeable implementations of that operation:

* ``'loop'``: one ``F.conv2d`` per sample (obviously correct: the reference).
* ``'grouped'``: the official codes' trick, the batch folded into the
  channels and one grouped conv with ``groups = B * groups``.
* ``'unfold'``: im2col + batched matmul; its graph does not depend on the
  batch size, so it is the path used for ONNX export.
* ``'auto'``: picks one of the above for the device and shape.

:func:`pointwise_per_sample_conv`: a 1x1 conv with per-sample [C_out, C_in]
matrices as one batched matmul over the pixels (the 1x1 paths of the
dynamic layers).

The CPU inference path that builds deep layers' kernels into a reused
workspace is an accelerator: :mod:`mmdyn.ops.accel.chunked`.

torch only.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .capture import compiling, graph_capture

PER_SAMPLE_CONV_IMPLS = ('auto', 'loop', 'grouped', 'unfold')


def per_sample_conv2d(x: torch.Tensor,
                      weight: torch.Tensor,
                      bias: Optional[torch.Tensor] = None,
                      stride: Tuple[int, int] = (1, 1),
                      padding: Tuple[int, int] = (0, 0),
                      dilation: Tuple[int, int] = (1, 1),
                      groups: int = 1,
                      impl: str = 'auto') -> torch.Tensor:
    """Convolve sample ``b`` of ``x`` with ``weight[b]``.

    Args:
        x (Tensor): [B, C_in, H, W].
        weight (Tensor): [B, C_out, C_in // groups, kh, kw].
        bias (Tensor, optional): [B, C_out] or [C_out].
        stride, padding, dilation (tuple[int, int]): as ``F.conv2d``.
        groups (int): as ``F.conv2d``.
        impl (str): one of :data:`PER_SAMPLE_CONV_IMPLS`.

    Returns:
        Tensor: [B, C_out, H_out, W_out].
    """
    if impl not in PER_SAMPLE_CONV_IMPLS:
        raise ValueError(f'impl must be one of {PER_SAMPLE_CONV_IMPLS}, got '
                         f'{impl!r}')
    if impl == 'auto':
        impl = choose_impl(x, weight, groups)
    if impl == 'loop':
        return _conv_loop(x, weight, bias, stride, padding, dilation, groups)
    if impl == 'grouped':
        return _conv_grouped(x, weight, bias, stride, padding, dilation,
                             groups)
    return _conv_unfold(x, weight, bias, stride, padding, dilation, groups)


def choose_impl(x: torch.Tensor, weight: torch.Tensor, groups: int) -> str:
    """The implementation ``'auto'`` uses for these shapes and this device.

    Graphs that must hold for any batch size (TorchScript, ONNX export,
    ``torch.export``, ``torch.fx``) take ``'unfold'``, whose graph does not
    depend on it. ``torch.compile`` takes what eager takes: the
    batch-as-groups conv compiles with a symbolic batch too, and im2col
    columns would be a tensor ``kh * kw`` times the input's, kept for the
    backward in training (a ResNet-50 stage-1 3x3 layer at batch 64: about
    460 MB per layer).
    """
    if graph_capture() and not compiling():
        return 'unfold'
    if x.shape[0] == 1:
        return 'loop'  # a single plain conv
    # Measured (benchmarks/README.md): on CPU (oneDNN) the grouped conv is
    # close to a static conv of the same shape in the forward pass while the
    # loop of batch-1 convs is several times slower; on CUDA the grouped
    # conv is the official choice. But oneDNN's backward of a
    # batch-as-groups conv with a per-sample weight is pathological on CPU
    # (most of a KW ResNet-18 training step), so a CPU graph that needs
    # gradients takes the loop.
    if not x.is_cuda and torch.is_grad_enabled() and (x.requires_grad
                                                      or weight.requires_grad):
        return 'loop'
    return 'grouped'


def _conv_loop(x, weight, bias, stride, padding, dilation, groups):
    # unbind/split rather than weight[b]: the backward of B separate
    # selections would write B full-size zero gradients (O(B^2) traffic).
    biases = (
        bias.unbind(0) if bias is not None and bias.dim() == 2 else [bias] *
        x.shape[0])
    outs = [
        F.conv2d(xb, wb, bb, stride, padding, dilation, groups)
        for xb, wb, bb in zip(x.split(1, dim=0), weight.unbind(0), biases)
    ]
    return torch.cat(outs, dim=0)


def _conv_grouped(x, weight, bias, stride, padding, dilation, groups):
    batch, c_in, h, w = x.shape
    c_out = weight.shape[1]
    out = F.conv2d(
        x.reshape(1, batch * c_in, h, w),
        weight.reshape(batch * c_out, *weight.shape[2:]), None, stride,
        padding, dilation, groups * batch)
    out = out.reshape(batch, c_out, out.shape[-2], out.shape[-1])
    if bias is not None:
        out = out + (bias if bias.dim() == 2 else bias.expand(
            batch, c_out)).reshape(batch, c_out, 1, 1).to(out.dtype)
    return out


def _conv_unfold(x, weight, bias, stride, padding, dilation, groups):
    # Python ints: only the batch may vary in a traced/exported graph; the
    # kernel and feature sizes are constants of the layer and the input.
    h, w = int(x.shape[2]), int(x.shape[3])
    c_out, c_in_g, kh, kw = (int(v) for v in weight.shape[1:])
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(
        x, (kh, kw), dilation=dilation, padding=padding,
        stride=stride)  # [B, C_in*kh*kw, L]
    # -1 for the batch so that a traced graph does not bake it in.
    cols = cols.reshape(-1, groups, c_in_g * kh * kw, h_out * w_out)
    kernel = weight.reshape(-1, groups, c_out // groups, c_in_g * kh * kw)
    if c_out == groups:
        # Depthwise: a weighted sum of the columns (the same work as the
        # matrix-vector products). AOTAutograd traces matmul's backward
        # with views of the output gradient that a channels-last gradient
        # (ConvNeXt's LayerNorm2d after a depthwise conv) cannot take.
        out = (kernel.transpose(2, 3) * cols).sum(2, keepdim=True)
    else:
        out = torch.matmul(kernel, cols)  # [B, g, C_out/g, L]
    out = out.reshape(-1, c_out, h_out, w_out)
    if bias is not None:
        b = bias if bias.dim() == 2 else bias.unsqueeze(0)
        out = out + b.reshape(-1, c_out, 1, 1).to(out.dtype)
    return out


def pointwise_per_sample_conv(
    x: torch.Tensor,
    matrices: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: Tuple[int, int] = (1, 1)
) -> torch.Tensor:
    """An unpadded 1x1 conv of each sample with its own matrix: sample ``b``
    of ``x`` [B, C_in, H, W] times ``matrices[b]`` [C_out, C_in] over its
    pixels, as one batched matmul (``stride`` by subsampling ``x``); plus
    ``bias``, [C_out] or per sample [B, C_out]."""
    if tuple(stride) != (1, 1):
        x = x[:, :, ::stride[0], ::stride[1]]
    batch, channels, height, width = x.shape
    out = torch.bmm(matrices, x.reshape(batch, channels, height * width))
    out = out.view(batch, -1, height, width)
    if bias is not None:
        out += bias.reshape(-1, out.shape[1], 1, 1).to(out.dtype)
    return out
